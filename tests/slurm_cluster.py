"""A throw-away single-node Slurm cluster on 127.0.0.1 for the integration tests.

`start_cluster(folder)` writes a private munge key and slurm.conf into `folder`, starts munged (as the
munge user), slurmctld and slurmd in the foreground as child processes and waits until the node
accepts jobs; `cluster.stop()` ends exactly those three processes by PID. Clients find the cluster
through the SLURM_CONF variable in `cluster.env`. Nothing outside `folder` is changed, so a
system-wide Slurm or munge (if any) is left alone.

`ensure_packages()` installs the Debian packages when they are missing and apt-get is usable (root);
it returns None when everything is there, otherwise the reason the tests must be skipped.
"""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def _missing_programs():
    # the daemons live in /usr/sbin, which is not on every PATH
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [p for p in PROGRAMS if shutil.which(p, path=path) is None]


def program(name):
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def ensure_packages(install=True):
    """None when Slurm + munge are usable, else a one-line reason to skip."""
    if not _missing_programs():
        return _check_munge_user()
    if not install:
        return f"Slurm/munge programs missing: {', '.join(_missing_programs())}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"Slurm/munge programs missing ({', '.join(_missing_programs())}) and they cannot be installed "
                "here (needs root and apt-get): apt-get install slurmctld slurmd slurm-client munge")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        if subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=600).returncode != 0:
            # package lists may be missing on a fresh image: refresh once and retry
            subprocess.run(["apt-get", "update"], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=600)
            result = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], env=env,
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
                return f"apt-get install {' '.join(PACKAGES)} failed: {last[0]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get install {' '.join(PACKAGES)} failed: {exc}"
    if _missing_programs():
        return f"Slurm/munge programs still missing after apt-get: {', '.join(_missing_programs())}"
    return _check_munge_user()


def _check_munge_user():
    if os.geteuid() != 0:
        return "a private Slurm needs root (slurmd starts jobs as the submitting user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "the munge user does not exist (the munge package creates it)"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 2048


SLURM_CONF = """\
ClusterName=testcluster
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default memory per CPU every job asks for the whole node and jobs run one at a time
DefMemPerCPU={mem_per_cpu}
# finished jobs leave the controller quickly, so `sbatch --wait` notices the end within seconds
MinJobAge=5
# a failed parent cancels its afterok children instead of leaving them pending forever
DependencyParameters=kill_invalid_depend
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """The running daemons (Popen objects) and the environment clients need."""

    def __init__(self, root):
        self.root = root
        self.processes = {}
        self.env = dict(os.environ, SLURM_CONF=os.path.join(root, "slurm.conf"))

    def run(self, *args, check=True, timeout=60, **kwargs):
        return subprocess.run(list(args), env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, check=check, stdin=subprocess.DEVNULL, **kwargs)

    def log_tail(self, lines=20):
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def stop(self):
        """SIGTERM each daemon this cluster started (by PID), SIGKILL what is still alive after 15 s."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.get(name)
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.processes.clear()


def _start(cluster, name, argv, **kwargs):
    log = open(os.path.join(cluster.root, f"{name}.stdout"), "w")
    cluster.processes[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                               env=cluster.env, **kwargs)
    log.close()


def _wait_for(condition, what, cluster, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                   f"{cluster.log_tail()}")
        if condition():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}\n{cluster.log_tail()}")


def start_cluster(root=None):
    """Start munged + slurmctld + slurmd with every file under `root`; returns a Cluster."""
    root = root or tempfile.mkdtemp(prefix="slurm-test-")
    # munged refuses world-writable or foreign-owned folders: give it its own 0700 folder
    munge_user = pwd.getpwnam("munge")
    munge_dir = os.path.join(root, "munge")
    os.makedirs(munge_dir, mode=0o700, exist_ok=True)
    os.chmod(root, 0o755)  # the munge user must traverse into its folder
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    key = os.path.join(munge_dir, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(128))
    os.chmod(key, 0o400)
    for path in (munge_dir, key):
        os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
    munge_socket = os.path.join(munge_dir, "munge.socket")

    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = max(256, _memory_mb() // 2)
    with open(os.path.join(root, "slurm.conf"), "w") as f:
        f.write(SLURM_CONF.format(host=host, root=root, munge_socket=munge_socket, ctld_port=_free_port(),
                                  slurmd_port=_free_port(), cpus=cpus, memory_mb=memory_mb,
                                  mem_per_cpu=max(64, memory_mb // (4 * cpus))))
    cluster = Cluster(root)
    try:
        _start(cluster, "munged", [program("munged"), "--foreground", "--force", f"--key-file={key}",
                                   f"--socket={munge_socket}", f"--pid-file={munge_dir}/munged.pid",
                                   f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"],
               user=munge_user.pw_uid, group=munge_user.pw_gid, cwd=munge_dir)
        _wait_for(lambda: os.path.exists(munge_socket), "the munge socket", cluster)
        _start(cluster, "slurmctld", [program("slurmctld"), "-D", "-i", "-f", os.path.join(root, "slurm.conf")],
               cwd=root)
        _wait_for(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") >= 1,
                  "slurmctld to answer", cluster)
        _start(cluster, "slurmd", [program("slurmd"), "-D", "-N", host, "-f", os.path.join(root, "slurm.conf")],
               cwd=root)
        _wait_for(lambda: cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip() in ("idle", "mix"),
                  "the node to become idle", cluster, timeout=90)
    except BaseException:
        cluster.stop()
        raise
    return cluster
