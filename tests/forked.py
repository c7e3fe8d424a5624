"""Start the real scripts fast, to kill them: `Run("sft.py", args)` runs `python sft.py args` (the file
as __main__, so its own error handling applies) in a process forked from a server process that has
imported torch, transformers, DeepSpeed and the scripts once (multiprocessing's forkserver). A start
takes ~1 s instead of the ~8 s of a fresh interpreter, which is what makes a dozen kill -9s affordable
in the test suite. `nproc=2` starts two ranks with torchrun's environment (each its own process,
without torchrun's agent, so that a test can kill one rank and then the other, as the agent would).

The server forks from a clean process, not from pytest: no test's threads or state are inherited.

`run(script, args, nproc=...)` is the same start for the tests that only need a script's outcome: it
returns what `subprocess.run(capture_output=True)` would (`returncode`, `stdout`, `stderr`), so a test
suite of ~40 starts does not spend ~8 s of imports on each. The launchers users type (python, torchrun,
deepspeed) are exercised as such by run.sh's tests and the rehearsals."""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import resource
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ["forked", "torch", "torch.distributed", "transformers", "deepspeed", "openai", "google.genai", "data",
           "model", "reward", "predict", "sft", "grpo", "eval", "annotate"]
_ctx = None


def context():
    """The forkserver context, its server started once with the preloads and a CPU environment."""
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                          TOKENIZERS_PARALLELISM="false", FORCE_QWENVL_VIDEO_READER="decord",
                          TRANSFORMERS_VERBOSITY="error",  # and the preloads' path (Python 3.11's server
                          PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))  # ignores sys.path)
        try:
            multiprocessing.forkserver.ensure_running()  # the server keeps the environment it starts with
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return _ctx


def _main(script: str, argv: list[str], env: dict, log: str, max_file_bytes: int | None, err_log: str | None) -> None:
    """In the forked process: the environment, the repo as working directory (as the tests' subprocesses
    had), stdout to `log` and stderr to `err_log` (or also to `log`), then the script as __main__."""
    os.environ.update(env)
    os.chdir(ROOT)
    for fd_to, path in ((1, log), (2, err_log or log)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, fd_to)
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if max_file_bytes:  # a write past it fails with EFBIG (Python ignores SIGXFSZ): a disk that fills up
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    sys.argv = [script, *argv]
    runpy.run_path(str(ROOT / script), run_name="__main__")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """`python SCRIPT ARGS`, or `torchrun --nproc_per_node NPROC SCRIPT ARGS`, forked (see the module)."""

    def __init__(self, script: str, args, log: Path, nproc: int = 1, max_file_bytes: int | None = None,
                 env: dict | None = None, split: bool = False):
        """Each rank's stdout and stderr go to one log, `log` (`log.rankR` with nproc > 1), or with
        `split` to `log.out` and `log.err` (`log.rankR.out`, ...)."""
        self.logs = [Path(f"{log}.rank{r}") if nproc > 1 else Path(log) for r in range(nproc)]
        self.split = split
        port = free_port()
        self.procs = []
        for r in range(nproc):
            ranks = {} if nproc == 1 else dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                                               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                                               MASTER_PORT=str(port))
            p = context().Process(target=_main, args=(script, [str(a) for a in args], {**(env or {}), **ranks},
                                                      f"{self.logs[r]}.out" if split else str(self.logs[r]),
                                                      max_file_bytes, f"{self.logs[r]}.err" if split else None),
                                  daemon=True)
            p.start()
            self.procs.append(p)

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def kill(self, rank: int | None = None) -> None:
        """SIGKILL one rank (or all)."""
        for r, p in enumerate(self.procs):
            if (rank is None or r == rank) and p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        for r, p in enumerate(self.procs):
            if rank is None or r == rank:
                p.join()

    def wait(self, timeout: float = 300) -> list[int]:
        """The exit codes (-9 for a kill); a run that outlives `timeout` fails the test with its log."""
        deadline = time.time() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.time()))
        if self.alive():
            self.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.text()[-4000:]}")
        return [p.exitcode for p in self.procs]

    def text(self, stream: str = "") -> str:
        """The ranks' logs, rank 0 first (with `split`: stream "out" or "err", or both)."""
        names = [f"{p}.{x}" for p in self.logs for x in ([stream] if stream else ["out", "err"])] if self.split \
            else self.logs
        return "".join(Path(p).read_text(errors="replace") for p in names if Path(p).exists())

    def until(self, cond, timeout: float = 120, every: float = 0.001) -> None:
        """Poll cond() while the run lives; fail if it ends or times out first."""
        deadline = time.time() + timeout
        while not cond():
            if not self.alive() or time.time() > deadline:
                self.kill()
                raise AssertionError(f"the moment never came (exit codes {[p.exitcode for p in self.procs]}):\n"
                                     f"{self.text()[-4000:]}")
            time.sleep(every)


def run(script: str, args, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`subprocess.run([python, script, *args], capture_output=True, text=True)`, or with nproc > 1 its
    torchrun equivalent, forked (see the module). As torchrun's agent does, a rank that fails stops the
    others (after a 5 s grace, for their own messages); the return code is a failed rank's own."""
    with tempfile.TemporaryDirectory() as d:
        r = Run(script, args, Path(d) / "log", nproc=nproc, split=True)
        deadline = time.time() + timeout
        failed_at = None
        while r.alive():
            if failed_at is None and any(p.exitcode not in (None, 0) for p in r.procs):
                failed_at = time.time()
            if time.time() > deadline:
                r.kill()
                raise subprocess.TimeoutExpired([script, *map(str, args)], timeout, r.text("out"), r.text("err"))
            if failed_at is not None and time.time() > failed_at + 5:
                r.kill()
            time.sleep(0.02)
        codes = [p.exitcode for p in r.procs]  # a failure's own code before the -9 of a rank stopped for it
        code = next((c for c in codes if c > 0), next((c for c in codes if c), 0))
        return subprocess.CompletedProcess([script, *map(str, args)], code, r.text("out"), r.text("err"))
