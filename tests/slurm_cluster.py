"""A single-node SLURM with accounting, started from a temp dir for the tests and stopped after.

Debian's packages (slurmctld, slurmd, slurmdbd, slurm-client, munge, mariadb-server) are used as
installed; nothing under /etc is read or written and no systemd is needed. Every daemon runs in
the foreground as a child of this process, with its config, state, sockets and logs in one dir:

    munged       key and socket in <root>/munge
    mariadbd     datadir <root>/mysql, TCP on 127.0.0.1 only (slurmdbd's storage)
    slurmdbd     accounting, so `sacct` and `sacctmgr` work as on a real cluster
    slurmctld    controller on 127.0.0.1
    slurmd       the one node, named `hostname -s`, on 127.0.0.1

Clients find the cluster through SLURM_CONF (see `SlurmCluster.env`). Ports are picked free at
start, so two clusters on one machine do not collide. By hand (prints the environment to use):

    python tests/slurm_cluster.py /tmp/slurm-by-hand
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

BINARIES = ("munged", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "slurmctld", "slurmd",
            "sbatch", "srun", "scancel", "squeue", "sinfo", "sacct", "sacctmgr", "scontrol")
CLUSTER = "quambatest"
PARTITION = "quamba"
ACCOUNT = "quamba"
# Every rule's mem_mb must fit the node or sbatch refuses the job outright. Memory is bookkeeping
# here (task/none enforces no limit), so the node advertises at least this much.
NODE_MEMORY_MB = 32768
NODE_CPUS = 4


class ClusterUnavailable(RuntimeError):
    """The packages are missing or a daemon did not come up; the message says which and why."""


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return f"({path} was not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class SlurmCluster:
    """A cluster rooted at `root`; `start()` brings it up, `stop()` takes it down (idempotent)."""

    root: Path
    cluster: str = CLUSTER
    partition: str = PARTITION
    account: str = ACCOUNT
    startup_timeout_s: float = 90.0
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    user: str = field(default_factory=getpass.getuser)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.conf = self.root / "etc" / "slurm.conf"
        self.logs = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.mysql_socket = self.root / "mysql.sock"
        self.ports = {name: _free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mysql")}

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF and the srun shim: what every client (sbatch, sacct, snakemake) needs."""
        return {**os.environ, "SLURM_CONF": str(self.conf),
                "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """A client command against this cluster."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    # -- bring-up -------------------------------------------------------------------------------

    def start(self) -> Self:
        missing = missing_binaries()
        if missing:
            raise ClusterUnavailable(f"not installed: {', '.join(missing)} "
                                     "(apt-get install slurm-wlm slurmdbd munge mariadb-server)")
        for sub in ("bin", "etc", "log", "munge", "mysql", "state", "spool", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._write_srun_shim()
        try:
            self._start_munge()
            self._start_mariadb()
            self._write_slurm_conf()
            self._start_slurmdbd()
            self._register_accounting()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait("the node to be idle", lambda: self.run("sinfo", "-h", "-n", self.node, "-o", "%T",
                                                               check=False).stdout.strip() == "idle",
                       "slurmd")
        except BaseException:
            self.stop()
            raise
        return self

    def _write_srun_shim(self) -> None:
        """An srun that finds this cluster: inside a job, snakemake-executor-plugin-slurm-jobstep
        (0.6.1) drops every SLURM_* variable but the job's identity before its nested srun,
        SLURM_CONF included, so srun falls back to /etc/slurm and DNS SRV and finds nothing. A site
        cluster has /etc/slurm/slurm.conf (or configless slurmd) and does not notice."""
        shim = self.root / "bin" / "srun"
        shim.write_text(f"#!/bin/sh\nSLURM_CONF={self.conf} exec {shutil.which('srun')} \"$@\"\n")
        os.chmod(shim, 0o755)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.logs / f"{name}.out", "w") as log:  # the daemon keeps its own copy of the fd
            self._procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True)

    def _wait(self, what: str, ready, daemon: str) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            proc = self._procs.get(daemon)
            if proc is not None and proc.poll() is not None:
                raise ClusterUnavailable(f"{daemon} exited with {proc.returncode} while waiting for {what}:\n"
                                         f"{self._daemon_log(daemon)}")
            if ready():
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"timed out after {self.startup_timeout_s:.0f}s waiting for {what}:\n"
                                 f"{self._daemon_log(daemon)}")

    def _daemon_log(self, daemon: str) -> str:
        return "\n".join(_tail(path) for path in sorted(self.logs.glob(f"{daemon}*")))

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        # --force: munged refuses to run as root otherwise; the key and socket dir are ours alone.
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={self.root / 'run' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                               f"--log-file={self.logs / 'munged.log'}"])
        self._wait("munged's socket", self.munge_socket.exists, "munged")

    def _start_mariadb(self) -> None:
        datadir = self.root / "mysql"
        install = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}",
                                  f"--user={self.user}", "--auth-root-authentication-method=socket",
                                  "--skip-test-db"], capture_output=True, text=True, check=False)
        if install.returncode != 0:
            raise ClusterUnavailable(f"mariadb-install-db failed:\n{install.stdout[-2000:]}{install.stderr[-2000:]}")
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={datadir}", f"--user={self.user}",
                                 f"--socket={self.mysql_socket}", f"--port={self.ports['mysql']}",
                                 "--bind-address=127.0.0.1", "--skip-name-resolve",
                                 f"--pid-file={self.root / 'run' / 'mariadbd.pid'}",
                                 f"--log-error={self.logs / 'mariadbd.log'}",
                                 "--innodb-buffer-pool-size=64M", "--innodb-lock-wait-timeout=900"])
        self._wait("MariaDB", lambda: self._sql("SELECT 1", check=False).returncode == 0, "mariadbd")
        self.db_password = secrets.token_hex(12)
        self._sql(f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.db_password}'; "
                  "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")

    def _sql(self, statement: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["mariadb", "--no-defaults", f"--socket={self.mysql_socket}", "-u", self.user,
                               "-e", statement], capture_output=True, text=True, check=check)

    def _write_slurm_conf(self) -> None:
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        dbd_conf = self.conf.with_name("slurmdbd.conf")
        dbd_conf.write_text(
            auth
            + f"DbdHost=localhost\nDbdPort={self.ports['slurmdbd']}\nSlurmUser={self.user}\n"
            f"PidFile={self.root / 'run' / 'slurmdbd.pid'}\nLogFile={self.logs / 'slurmdbd.log'}\n"
            "StorageType=accounting_storage/mysql\n"
            f"StorageHost=127.0.0.1\nStoragePort={self.ports['mysql']}\n"
            f"StorageUser=slurm\nStoragePass={self.db_password}\nStorageLoc=slurm_acct_db\n")
        os.chmod(dbd_conf, 0o600)  # slurmdbd refuses a readable config: it holds the DB password
        # Declared, not real (config_overrides below): the node must fit the workflow's largest
        # request, assemble's 4 threads, or that job waits for a node that never comes.
        cpus = max(NODE_CPUS, os.cpu_count() or 1)
        self.conf.write_text(
            f"ClusterName={self.cluster}\n"
            f"SlurmctldHost={self.node}(127.0.0.1)\n"
            f"SlurmctldPort={self.ports['slurmctld']}\nSlurmdPort={self.ports['slurmd']}\n"
            f"SlurmUser={self.user}\n"
            + auth
            + "CredType=cred/munge\n"
            f"StateSaveLocation={self.root / 'state'}\nSlurmdSpoolDir={self.root / 'spool'}\n"
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={self.root / 'run' / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}\nSlurmdLogFile={self.logs / 'slurmd.log'}\n"
            # No cgroups here (and none needed): processes are tracked by parentage, not confined.
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/linux\nMpiDefault=none\n"
            "SchedulerType=sched/backfill\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core_Memory\n"
            # The node's declared CPUs and memory are taken as given, so a 2-core box can accept
            # the workflow's real per-rule requests; nothing is enforced either way.
            "SlurmdParameters=config_overrides\n"
            "ReturnToService=2\nMinJobAge=300\n"
            "AccountingStorageType=accounting_storage/slurmdbd\n"
            f"AccountingStorageHost=localhost\nAccountingStoragePort={self.ports['slurmdbd']}\n"
            # Connections to slurmdbd take their munge socket from here, not from AuthInfo.
            f"AccountingStoragePass={self.munge_socket}\n"
            "AccountingStorageEnforce=associations\nJobCompType=jobcomp/none\n"
            # sacct then shows each job's --comment, where the plugin names the rule and wildcards.
            "AccountingStoreFlags=job_comment\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={NODE_MEMORY_MB} State=UNKNOWN\n"
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n")

    def _start_slurmdbd(self) -> None:
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait("slurmdbd", lambda: self.run("sacctmgr", "-n", "list", "cluster", check=False).returncode == 0,
                   "slurmdbd")

    def _register_accounting(self) -> None:
        """The cluster, an account and this user in it: what sbatch -A and the plugin's check need."""
        self.run("sacctmgr", "-i", "add", "cluster", self.cluster)
        self.run("sacctmgr", "-i", "add", "account", self.account, f"Cluster={self.cluster}",
                 "Description=quamba-flow tests", "Organization=quamba-flow")
        self.run("sacctmgr", "-i", "add", "user", self.user, f"Account={self.account}",
                 f"DefaultAccount={self.account}", f"Cluster={self.cluster}")

    # -- tear-down ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every job, then stop the daemons in reverse order of start (SIGTERM, then SIGKILL)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "-u", self.user, check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-by-hand")
    with SlurmCluster(root) as cluster:
        print(f"cluster up; in another shell:\n  export SLURM_CONF={cluster.conf}\n"
              f"  sinfo; sbatch -A {cluster.account} -p {cluster.partition} --wrap 'hostname'; sacct\n"
              f"logs in {cluster.logs}; Ctrl-C stops every daemon.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
