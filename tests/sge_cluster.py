"""A throw-away single-host Son of Grid Engine cell for the integration tests.

`start_cell(folder)` builds a private SGE_ROOT in `folder` (links to the installed binaries plus its own
cell: bootstrap, Berkeley DB spool, configuration allowing root jobs), starts sge_qmaster and sge_execd
on free ports, and adds one queue (`all.q`, 2 slots, no load thresholds: the test machine is busy) and a
parallel environment `smp` (submit_job.sh asks for `-pe smp N`). Clients find the cell through
`cell.env` (SGE_ROOT, SGE_CELL, SGE_QMASTER_PORT, SGE_EXECD_PORT). `cell.stop()` ends both daemons by
the PIDs they wrote. The system-wide cell of the Debian packages is not touched.

`ensure_packages()` returns None when the packages are installed (installing them when allowed), else
the reason the tests must be skipped.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

PACKAGES = ("gridengine-master", "gridengine-exec", "gridengine-client")
SYSTEM_ROOT = "/var/lib/gridengine"   # where the Debian packages put bin/ lib/ util/ utilbin/
DAEMONS = {"qmaster": "/usr/sbin/sge_qmaster", "execd": "/usr/sbin/sge_execd"}
TOOLS = ("/usr/lib/gridengine/spoolinit", "/usr/lib/gridengine/spooldefaults")
DEFAULTS = "/usr/share/gridengine"


def _missing():
    paths = list(DAEMONS.values()) + list(TOOLS) + [os.path.join(SYSTEM_ROOT, "util", "arch")]
    missing = [p for p in paths if not os.path.exists(p)]
    return missing + [p for p in ("qsub", "qconf", "qstat") if shutil.which(p) is None]


def ensure_packages(install=True):
    if not _missing():
        return None if os.geteuid() == 0 else "a private SGE cell here needs root"
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"Grid Engine missing ({', '.join(_missing())}): apt-get install {' '.join(PACKAGES)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        result = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get install {' '.join(PACKAGES)} failed: {exc}"
    if result.returncode != 0 or _missing():
        return f"apt-get install {' '.join(PACKAGES)} failed: {(result.stderr or result.stdout).strip()[-300:]}"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cell:
    def __init__(self, root, env):
        self.root, self.env = root, env
        self.pids = {}

    def run(self, *args, check=True, timeout=60, **kwargs):
        return subprocess.run(list(args), env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, check=check, stdin=subprocess.DEVNULL, **kwargs)

    def log_tail(self, lines=15):
        out = []
        for path in [os.path.join(self.root, "qmaster", "messages")] + \
                [os.path.join(d, "messages") for d in _glob_dirs(os.path.join(self.root, "execd"))]:
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {path}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def stop(self):
        """SIGTERM execd then qmaster (by the PIDs they wrote), SIGKILL whatever is left after 20 s."""
        for name in ("execd", "qmaster"):
            pid = self.pids.get(name) or _read_pid(self.root, name)
            if pid:
                self.pids[name] = pid
                _signal(pid, signal.SIGTERM)
        deadline = time.time() + 20
        for name, pid in self.pids.items():
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.3)
            if _alive(pid):
                _signal(pid, signal.SIGKILL)


def _glob_dirs(folder):
    return [os.path.join(folder, d) for d in os.listdir(folder)] if os.path.isdir(folder) else []


def _read_pid(root, name):
    folders = [os.path.join(root, "qmaster")] if name == "qmaster" else _glob_dirs(os.path.join(root, "execd"))
    for folder in folders:
        path = os.path.join(folder, f"{name}.pid")
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit():
                return int(text)
    return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (our own exited child) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _edit_script(root, name, substitutions):
    """An $EDITOR for `qconf -a*` that applies sed substitutions to the template it is given."""
    path = os.path.join(root, f"edit_{name}.sh")
    expressions = " ".join(f"-e 's#^{key} .*#{key} {value}#'" for key, value in substitutions.items())
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nsed -i {expressions} \"$1\"\n")
    os.chmod(path, 0o755)
    return path


def _wait_for(condition, what, cell, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}\n{cell.log_tail()}")


def start_cell(root=None):
    root = root or tempfile.mkdtemp(prefix="sge-test-")
    sge_root = os.path.join(root, "sge_root")
    common = os.path.join(sge_root, "default", "common")
    for folder in (common, os.path.join(root, "qmaster"), os.path.join(root, "execd"), os.path.join(root, "spooldb")):
        os.makedirs(folder, exist_ok=True)
    for name in ("bin", "lib", "util", "utilbin"):
        if os.path.exists(os.path.join(SYSTEM_ROOT, name)):
            os.symlink(os.path.join(SYSTEM_ROOT, name), os.path.join(sge_root, name))
    host = socket.gethostname().split(".")[0]
    with open(os.path.join(common, "bootstrap"), "w") as f:
        f.write(f"admin_user none\ndefault_domain none\nignore_fqdn true\nspooling_method berkeleydb\n"
                f"spooling_lib libspoolb\nspooling_params {root}/spooldb\nbinary_path /usr/sbin\n"
                f"qmaster_spool_dir {root}/qmaster\nsecurity_mode none\nlistener_threads 2\nworker_threads 2\n"
                f"scheduler_threads 1\n")
    with open(os.path.join(common, "act_qmaster"), "w") as f:
        f.write(host + "\n")
    # the host's address also resolves to "localhost"; SGE must see both names as this one host
    with open(os.path.join(common, "host_aliases"), "w") as f:
        f.write(f"{host} localhost\n")
    with open(os.path.join(DEFAULTS, "default-configuration")) as f:
        configuration = f.read()
    replacements = {"execd_spool_dir": f"{root}/execd", "min_uid": "0", "min_gid": "0", "load_report_time": "00:00:05"}
    lines = []
    for line in configuration.splitlines():
        key = line.split()[0] if line.strip() and not line.startswith("#") else None
        lines.append(f"{key} {replacements[key]}" if key in replacements else line)
    with open(os.path.join(root, "configuration"), "w") as f:
        f.write("\n".join(lines) + "\n")

    env = dict(os.environ, SGE_ROOT=sge_root, SGE_CELL="default", SGE_QMASTER_PORT=str(_free_port()),
               SGE_EXECD_PORT=str(_free_port()))
    env.pop("SGE_CLUSTER_NAME", None)
    cell = Cell(root, env)
    spool = [TOOLS[0], "berkeleydb", "libspoolb", f"{root}/spooldb"]
    cell.run(*spool, "init")
    cell.run(TOOLS[1], "configuration", os.path.join(root, "configuration"))
    cell.run(TOOLS[1], "complexes", os.path.join(DEFAULTS, "util", "resources", "centry"))
    cell.run(TOOLS[1], "usersets", os.path.join(DEFAULTS, "util", "resources", "usersets"))
    cell.run(TOOLS[1], "managers", "root")
    try:
        cell.run(DAEMONS["qmaster"])   # daemonises; its PID goes to qmaster/qmaster.pid
        _wait_for(lambda: cell.run("qconf", "-sh", check=False).returncode == 0, "sge_qmaster", cell)
        cell.pids["qmaster"] = _read_pid(root, "qmaster")
        cell.run("qconf", "-as", host)
        exec_host = os.path.join(root, "exechost")
        with open(exec_host, "w") as f:
            f.write(f"hostname {host}\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\n"
                    f"projects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n")
        cell.run("qconf", "-Ae", exec_host)
        pe = os.path.join(root, "pe_smp")
        with open(pe, "w") as f:
            f.write("pe_name smp\nslots 999\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args NONE\n"
                    "stop_proc_args NONE\nallocation_rule $pe_slots\ncontrol_slaves FALSE\njob_is_first_task TRUE\n"
                    "urgency_slots min\naccounting_summary FALSE\nqsort_args NONE\n")
        cell.run("qconf", "-Ap", pe)
        # schedule every second, and ignore the machine's load (other work shares it)
        cell.run("qconf", "-msconf", env=dict(env, EDITOR=_edit_script(root, "sconf", {
            "schedule_interval": "0:0:1", "flush_submit_sec": "1", "flush_finish_sec": "1",
            "job_load_adjustments": "NONE", "load_adjustment_decay_time": "0:0:0"})))
        cell.run("qconf", "-aq", "all.q", env=dict(env, EDITOR=_edit_script(root, "queue", {
            "hostlist": host, "slots": str(os.cpu_count() or 1), "pe_list": "smp", "shell": "/bin/bash",
            "shell_start_mode": "unix_behavior", "load_thresholds": "NONE"})))
        cell.run(DAEMONS["execd"])
        _wait_for(lambda: _read_pid(root, "execd") is not None, "sge_execd", cell)
        cell.pids["execd"] = _read_pid(root, "execd")

        def queue_ready():
            lines = cell.run("qstat", "-f", check=False).stdout.splitlines()
            rows = [line.split() for line in lines if line.startswith("all.q@")]
            # a healthy queue instance has no state column (e.g. 'au' = alarm / unknown)
            return bool(rows) and len(rows[0]) == 5 and rows[0][3] != "-NA-"
        _wait_for(queue_ready, "the queue to come up", cell, timeout=90)
    except BaseException:
        cell.stop()
        raise
    return cell
