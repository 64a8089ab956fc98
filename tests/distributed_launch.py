"""Run a Python script on several local processes with MLX's ring backend
(``mlx.launch --backend ring`` on 127.0.0.1), bounded in time.

Ports: the ring backend listens on ``starting_port + rank``. mlx.launch's
default (32323) would collide between test runs on one machine, so a block of
free consecutive ports is chosen below the kernel's ephemeral range (where
outgoing connections take theirs), and the launch is retried on another
block if a port was taken in between.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

# mlx.launch is a console script: run its entry point with this interpreter.
LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
_PORTS = range(20000, 32000)
_TAKEN = ("Couldn't bind socket", "Address already in use")


def free_port_block(count: int, rng: random.Random) -> int:
    """A first port p with p .. p + count - 1 all free on 127.0.0.1 now."""
    for _ in range(200):
        first = rng.randrange(_PORTS.start, _PORTS.stop - count)
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports in {_PORTS}")


def launch(script: Path | str, args: list[str], processes: int, *, timeout: float = 60.0,
           cwd: Path | str | None = None, attempts: int = 3) -> subprocess.CompletedProcess:
    """``mlx.launch --backend ring -n processes --python <this python> script
    args``; the whole process group is killed after ``timeout`` seconds
    (subprocess.TimeoutExpired is raised then, with the output so far).
    Its exit status says nothing: mlx.launch exits 0 when a rank fails."""
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    for attempt in range(attempts):
        port = free_port_block(processes, rng)
        command = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(processes),
                   "--starting-port", str(port), "--python", sys.executable, str(script), *args]
        # Its own process group: a timeout kills mlx.launch and every rank.
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(command, timeout, output=out, stderr=err) from None
        done = subprocess.CompletedProcess(command, proc.returncode, out, err)
        # (mlx.launch exits 0 even when a rank failed: the caller checks
        # what every rank wrote; a port taken in between is retried here)
        if attempt + 1 == attempts or not any(t in err for t in _TAKEN):
            return done
    return done
