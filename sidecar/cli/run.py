"""``rankside run [serve options] -- COMMAND...``: a node's sidecar for the length of a command.

For bare metal and Slurm, where nothing else starts the sidecar: ``run``
starts ``rankside serve`` with the same options as a child process, waits
until it is ready, runs the command with ``RANKSIDE_SOCKET`` set, stops the
sidecar once the command has ended and exits with the command's status.

Signals go to the command first. The sidecar runs in a session of its own, so
a Ctrl-C in the terminal reaches the command (torchrun, which stops its
workers) but not the sidecar, which stays up to see the workers end. Signals
sent to ``rankside run`` itself are passed on to the command; a terminal's
SIGINT or SIGQUIT is not passed on again, since the command, in the same
process group, has had it already.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from sidecar.cli.options import RUN, config_from_args, flags_with_values
from sidecar.config import Config
from sidecar.schema import PID_HEADER

log = logging.getLogger("rankside.run")

# Signals passed on to the command.
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# si_code of a signal the kernel sent, as a terminal does for Ctrl-C and Ctrl-\.
SI_KERNEL = 0x80
_PR_SET_PDEATHSIG = 1
SIDECAR_STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05

RUN_OPTIONS_WITH_VALUE = flags_with_values([RUN])


def split_argv(argv: Sequence[str], remainder: Sequence[str]) -> tuple[list[str], list[str]]:
    """(serve options, command) from ``run``'s own arguments (``argv`` after ``run``).

    The command is whatever follows the first ``--``, or argparse's remainder
    when there is no ``--``. Options only ``run`` knows are left out.
    """
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        options, command = argv[:cut], argv[cut + 1 :]
    else:
        command = list(remainder)
        options = argv[: len(argv) - len(command)]
    serve_options: list[str] = []
    skip = False
    for token in options:
        if skip:
            skip = False
        elif token in RUN_OPTIONS_WITH_VALUE:
            skip = True
        elif not token.startswith(tuple(f"{o}=" for o in RUN_OPTIONS_WITH_VALUE)):
            serve_options.append(token)
    return serve_options, command


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def probe_url(config: Config) -> str | None:
    """Where to ask the sidecar whether it is ready; None for an ephemeral port."""
    host, port = config.host_port
    if port == 0:
        return None
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/readyz"


def is_ready(url: str | None, socket_path: str, token: str | None, pid: int) -> bool:
    """Whether the sidecar of process ``pid`` answers ``url`` (its /readyz) with 200.

    Another sidecar already on the port answers too, before ours has failed
    to bind: only an answer carrying our sidecar's pid counts.
    """
    if url is None:
        return os.path.exists(socket_path)
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return bool(response.status == 200 and response.headers.get(PID_HEADER) == str(pid))
    except (urllib.error.URLError, OSError):
        return False


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _libc_prctl()


def die_with_parent(signo: int = signal.SIGTERM) -> None:
    """Have the kernel send ``signo`` to this process when its parent dies (Linux).

    Safe between fork and exec. Elsewhere, and where prctl is missing, nothing.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signo, 0, 0, 0)


class Interrupted(Exception):
    """A signal arrived before the command started."""

    def __init__(self, signo: int) -> None:
        super().__init__(signal.Signals(signo).name)
        self.signo = signo


class Runner:
    """One ``rankside run``: the sidecar child, the command child and the signals between."""

    def __init__(self, config: Config, serve_options: list[str], command: list[str]) -> None:
        self.config = config
        self.serve_options = serve_options
        self.command = command
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self._old_mask: set[int | signal.Signals] = set()

    # -- children ---------------------------------------------------------------

    def _restore_mask(self) -> None:
        """In a forked child, before exec: the signals blocked here are not blocked there."""
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    def _sidecar_preexec(self) -> None:
        self._restore_mask()
        # The sidecar goes when rankside run goes, even if it is SIGKILLed.
        die_with_parent(signal.SIGTERM)

    def start_sidecar(self) -> None:
        argv = [
            sys.executable, "-m", "sidecar", "serve",
            *self.serve_options,
            "--socket", self.config.socket_path,
        ]  # fmt: skip
        self.sidecar = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=self._sidecar_preexec,
        )

    def wait_ready(self, timeout: float) -> str | None:
        """None once the sidecar is ready, or why it is not."""
        assert self.sidecar is not None
        url = probe_url(self.config)
        token = self.config.token if self.config.metrics_auth else None
        deadline = time.monotonic() + timeout
        while True:
            if self.sidecar.poll() is not None:
                return f"the sidecar exited with status {exit_status(self.sidecar.returncode)}"
            if is_ready(url, self.config.socket_path, token, self.sidecar.pid):
                return None
            if time.monotonic() > deadline:
                return f"the sidecar was not ready within {timeout:g} s"
            signo = self.wait_signal(POLL_INTERVAL)
            if signo is not None and signo != signal.SIGCHLD:
                raise Interrupted(signo)

    def start_command(self) -> None:
        env = dict(os.environ, RANKSIDE_SOCKET=self.config.socket_path)
        self.child = subprocess.Popen(
            self.command,
            env=env,
            preexec_fn=self._restore_mask,
        )

    def stop_sidecar(self) -> None:
        sidecar = self.sidecar
        if sidecar is None or sidecar.poll() is not None:
            return
        sidecar.send_signal(signal.SIGTERM)
        try:
            sidecar.wait(SIDECAR_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("the sidecar did not stop within %g s; killing it", SIDECAR_STOP_TIMEOUT)
            sidecar.kill()
            sidecar.wait()

    # -- signals ------------------------------------------------------------------

    def block_signals(self) -> None:
        """Forwarded signals (and SIGCHLD) wait for ``wait_signal`` instead of interrupting."""
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, signal.SIGCHLD})

    def unblock_signals(self) -> None:
        """Back to the signal mask from before; signals still pending are handled first."""
        while self.wait_signal(0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    def wait_signal(self, timeout: float) -> int | None:
        """The next blocked signal, passed on to the command if it needs to be."""
        info = signal.sigtimedwait([*FORWARDED, signal.SIGCHLD], timeout)
        if info is None:
            return None
        signo = info.si_signo
        if signo == signal.SIGCHLD:
            return signo
        name = signal.Signals(signo).name
        child = self.child
        if child is None or child.poll() is not None:
            log.debug("%s with no command running", name)
        elif info.si_code == SI_KERNEL:
            # From the terminal, to the whole foreground process group: the
            # command has it already.
            log.debug("%s from the terminal; the command has it too", name)
        else:
            log.info("passing %s on to the command (pid %d)", name, child.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signo)
        return signo

    def wait_command(self) -> int:
        assert self.child is not None and self.sidecar is not None
        sidecar_gone = False
        while self.child.poll() is None:
            self.wait_signal(POLL_INTERVAL * 2)
            if not sidecar_gone and self.sidecar.poll() is not None:
                sidecar_gone = True
                log.warning(
                    "the sidecar exited with status %d; the command goes on without it",
                    exit_status(self.sidecar.returncode),
                )
        return self.child.returncode


def run(args: argparse.Namespace) -> int:
    """``rankside run``; ``args.argv`` is the whole command line after the program name."""
    argv: list[str] = args.argv
    start = list(argv).index("run") + 1
    serve_options, command = split_argv(list(argv)[start:], args.cmd)
    if not command:
        print("rankside run: no command: rankside run [OPTIONS] -- COMMAND...", file=sys.stderr)
        return 2
    made_dir = None
    if not args.socket:
        made_dir = tempfile.mkdtemp(prefix="rankside-")
        args.socket = os.path.join(made_dir, "rankside.sock")
    try:
        config = config_from_args(args)
    except SystemExit:
        if made_dir is not None:
            os.rmdir(made_dir)
        raise
    runner = Runner(config, serve_options, command)
    runner.block_signals()
    try:
        runner.start_sidecar()
        try:
            problem = runner.wait_ready(args.ready_timeout)
        except Interrupted as exc:
            print(f"rankside run: interrupted by {exc} while starting", file=sys.stderr)
            return 128 + exc.signo
        if problem is not None:
            print(f"rankside run: {problem}; not running the command", file=sys.stderr)
            return 1
        try:
            runner.start_command()
        except OSError as exc:
            print(f"rankside run: cannot run {command[0]!r}: {exc}", file=sys.stderr)
            return 127 if isinstance(exc, FileNotFoundError) else 126
        return exit_status(runner.wait_command())
    finally:
        runner.stop_sidecar()
        runner.unblock_signals()
        if made_dir is not None:
            remove_empty_run_dir(made_dir, config.dump_path)


def remove_empty_run_dir(path: str, dump_path: str) -> None:
    """Remove the directory ``run`` made for the socket, unless dumps were written there."""
    if os.path.dirname(os.path.abspath(dump_path)) == path:
        with contextlib.suppress(OSError):
            os.rmdir(dump_path)
    try:
        os.rmdir(path)
    except OSError:
        print(f"rankside run: dumps kept in {path}", file=sys.stderr)
