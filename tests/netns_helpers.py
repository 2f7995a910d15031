"""Two hosts on one machine, for torchrun across them: two network namespaces joined by a veth pair.

    with TwoHosts.make() as hosts:           # or as a fixture; hosts.delete() always runs
        job = hosts.torchrun(hosts.a, ...)    # torchrun inside namespace A, its log in a file

Recipe (../shared/DESIGN.md, "Distributed"): `--rdzv_conf is_host=1` on host A (inside a namespace
torchrun cannot see that the endpoint is its own), `--local_addr` each side's own address (not the
hostname, which resolves to each namespace's own loopback) and GLOO_SOCKET_IFNAME each side's veth.
Nothing but the two namespaces' own addresses is ever used: the namespaces have no route anywhere else.

Run as a script it is train_helpers.py (facesense with its test hooks) plus one hook of its own,
which fires only in a worker's first attempt (TORCHELASTIC_RESTART_COUNT 0), so a restarted worker
runs to the end:
  FS_NETNS_KILL=worker|host and FS_NETNS_KILL_AFTER=N: when the training loader is asked for batch
  N + 1 (after N optimizer steps and any save there), the worker SIGKILLs itself (worker), or first
  its torchrun agent's process group and then itself (host: the whole host gone; torchrun starts its
  workers in sessions of their own, so the agent's group alone would leave the worker running).
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from train_helpers import ROOT, child_env  # noqa: E402

RDZV_PORT = 29400  # free in a fresh namespace
_counter = itertools.count()


def why_no_namespaces() -> str | None:
    """None when this process can make network namespaces, else why not (a skip reason)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def delete_leftovers() -> None:
    """Delete the namespaces this module made in a test process that no longer runs (killed before its
    finalizer ran): the names say whose they were (fs<pid>n<k>A|B). Anything still running in one ends
    by its own timeouts (rendezvous join, the test's subprocess limits)."""
    proc = _ip("netns", "list", check=False)
    for line in proc.stdout.splitlines():
        match = re.fullmatch(r"(fs(\d+)n\d+[AB])(\s.*)?", line.strip())
        if match and not Path(f"/proc/{match.group(2)}").exists():
            _ip("netns", "delete", match.group(1), check=False)


@dataclass(frozen=True)
class Host:
    ns: str  # network namespace
    ifname: str  # its end of the veth pair (GLOO_SOCKET_IFNAME)
    addr: str  # its address (--local_addr)

    def pids(self) -> list[int]:
        proc = _ip("netns", "pids", self.ns, check=False)
        return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []

    def kill_all(self) -> None:
        """SIGKILL every process in this namespace (all of them started by the tests)."""
        for _ in range(3):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


@dataclass
class Job:
    """One torchrun in one namespace: its process and the file its output goes to."""

    host: Host
    proc: subprocess.Popen
    log: Path

    def wait(self, timeout: float) -> int | None:
        """Its exit status, or None when it did not end within `timeout` s (then it is killed)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.host.kill_all()
            self.proc.kill()
            self.proc.wait(timeout=30)
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class TwoHosts:
    """Namespaces A and B, a veth pair between them (10.231.X.1/30 <-> 10.231.X.2/30), lo up in both."""

    def __init__(self) -> None:
        n = next(_counter)
        tag = f"fs{os.getpid()}n{n}"  # unique per process and call: no clash with other or leftover runs
        x = (os.getpid() * 7 + n) % 250 + 1  # each pair has a stack of its own; distinct only for readability
        self.a = Host(f"{tag}A", f"{tag}a", f"10.231.{x}.1")
        self.b = Host(f"{tag}B", f"{tag}b", f"10.231.{x}.2")
        self.made: list[Host] = []

    @classmethod
    def make(cls) -> "TwoHosts":
        delete_leftovers()
        hosts = cls()
        try:
            for host in (hosts.a, hosts.b):
                _ip("netns", "add", host.ns)
                hosts.made.append(host)
            # Both ends created straight inside their namespaces: nothing is ever added to this machine's own.
            _ip("link", "add", hosts.a.ifname, "netns", hosts.a.ns, "type", "veth",
                "peer", "name", hosts.b.ifname, "netns", hosts.b.ns)
            for host in (hosts.a, hosts.b):
                _ip("-n", host.ns, "addr", "add", f"{host.addr}/30", "dev", host.ifname)
                _ip("-n", host.ns, "link", "set", host.ifname, "up")
                _ip("-n", host.ns, "link", "set", "lo", "up")
        except BaseException:
            hosts.delete()
            raise
        return hosts

    def __enter__(self) -> "TwoHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def delete(self) -> None:
        """Kill what still runs in the namespaces, then delete them (which deletes the veth pair)."""
        for host in self.made:
            host.kill_all()
        for host in self.made:
            _ip("netns", "delete", host.ns, check=False)
        self.made = []

    def torchrun(self, host: Host, args: list[str], log: Path, *, nnodes: str = "2", max_restarts: int = 0,
                 rdzv_id: str = "job", join_timeout: int = 60, last_call_timeout: int = 1,
                 env: dict[str, str] | None = None) -> Job:
        """`torchrun ... tests/netns_helpers.py ARGS` (facesense with the test hooks) inside `host`'s namespace,
        one worker, meeting the other host at A's address. Output (stdout and stderr) goes to `log`."""
        conf = [f"join_timeout={join_timeout}", f"last_call_timeout={last_call_timeout}", "close_timeout=10",
                "read_timeout=30"]
        if host == self.a:
            conf.insert(0, "is_host=1")
        cmd = ["ip", "netns", "exec", host.ns, sys.executable, "-m", "torch.distributed.run",
               "--nnodes", nnodes, "--nproc_per_node", "1", "--max-restarts", str(max_restarts),
               "--monitor-interval", "0.5", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"{self.a.addr}:{RDZV_PORT}", "--rdzv_id", rdzv_id,
               "--rdzv_conf", ",".join(conf), "--local_addr", host.addr,
               str(Path(__file__).resolve()), *args]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as sink:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(**torchrun_env(host), **(env or {})),
                                    stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return Job(host, proc, log)


def torchrun_env(host: Host) -> dict[str, str]:
    """What torchrun needs in `host`'s environment: gloo on its veth, and (torch 2.14) no rendezvous store
    shared with the workers. By default the agent on node 0 keeps one TCPStore for every round and the
    workers' keys in it are not scoped per attempt: after a restart a worker can read the previous
    attempt's rank-0 gloo address and fail with "Connection refused" (measured here; pytorch issue
    #135712). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 rank 0's worker hosts a new store each round."""
    return {"GLOO_SOCKET_IFNAME": host.ifname, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def run_two(hosts: TwoHosts, args_a: list[str], args_b: list[str], logs: Path, timeout: float = 150,
            env_a: dict | None = None, env_b: dict | None = None, **options) -> tuple[int | None, int | None, str]:
    """torchrun in A and in B at once; (A's exit status, B's, both outputs). A status is None when that
    host did not finish within `timeout` s (everything left in the namespaces is then killed)."""
    jobs = [hosts.torchrun(hosts.a, args_a, logs / "A.log", env=env_a, **options),
            hosts.torchrun(hosts.b, args_b, logs / "B.log", env=env_b, **options)]
    deadline = time.monotonic() + timeout
    codes = [job.wait(max(1.0, deadline - time.monotonic())) for job in jobs]
    text = "".join(f"\n===== host {name} (exit {code}) =====\n{job.output()}"
                   for name, code, job in zip("AB", codes, jobs))
    return codes[0], codes[1], text


def _install_kill_hook() -> None:
    what, after = os.environ.get("FS_NETNS_KILL"), int(os.environ.get("FS_NETNS_KILL_AFTER", "0"))
    if not what or not after or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    import pipeline.loaders as loaders
    from benchmarks.env import with_train_batch_hook

    def on_batch(loader, n, images, labels):
        if n > after:
            if what == "host":
                os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return images, labels

    loaders.make_loader = with_train_batch_hook(loaders.make_loader, on_batch)


if __name__ == "__main__":
    import train_helpers

    _install_kill_hook()
    train_helpers._install_hooks()
    from facesense.cli import main

    sys.argv = ["facesense", *sys.argv[1:]]
    main()
