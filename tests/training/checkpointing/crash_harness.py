"""Launch tiny 2-rank pretraining runs as real processes (torch.distributed.run), so a
test can kill or signal one rank, and read back exact losses and checkpoint state."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron.training.checkpointing import directory as layout
from tests.training.gpt_runs import TINY_GPT

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_printing_losses.py")
LOSS_LINE = re.compile(r"^LOSS (\d+) (\S+)$", re.MULTILINE)
PID_LINE = re.compile(r"^PID (\d+) (\d+)$", re.MULTILINE)
LAUNCH_TIMEOUT_S = 240


@dataclass
class Finished:
    returncode: int
    output: str

    def losses(self) -> Dict[int, str]:
        """{iteration: float.hex of its loss}."""
        return {int(i): value for i, value in LOSS_LINE.findall(self.output)}


def command(flags: List[str], nproc: int = 2) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--monitor-interval=0.2", SCRIPT] + TINY_GPT + list(flags)


def environment(crash: Optional[str] = None, extra_env: Optional[dict] = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MEGATRON_CKPT_CRASH", None)
    if crash:
        env["MEGATRON_CKPT_CRASH"] = crash
    env.update(extra_env or {})
    return env


class Launch:
    """One run in the background; ``finish()`` waits for it."""

    def __init__(self, flags: List[str], crash: Optional[str] = None, extra_env: Optional[dict] = None):
        self.process = subprocess.Popen(command(flags), cwd=REPO_ROOT, env=environment(crash, extra_env),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)

    def finish(self, timeout: float = LAUNCH_TIMEOUT_S) -> Finished:
        try:
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            output, _ = self.process.communicate()
            raise AssertionError(f"run did not finish in {timeout} s:\n{output[-4000:]}")
        return Finished(self.process.returncode, output)


    def kill(self) -> None:
        """Stop the run's whole process group if it is still going (a failed test)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.communicate()


def run(flags: List[str], crash: Optional[str] = None, extra_env: Optional[dict] = None) -> Finished:
    return Launch(flags, crash, extra_env).finish()


def train_flags(iters: int, save: Optional[str] = None, load: Optional[str] = None,
                save_interval: Optional[int] = None) -> List[str]:
    flags = ["--train-iters", str(iters)]
    if save:
        flags += ["--save", save]
    if load:
        flags += ["--load", load]
    if save_interval:
        flags += ["--save-interval", str(save_interval)]
    return flags


def copy_checkpoint(source_root: str, iteration: int, target_root: str) -> str:
    """A fresh checkpoint root holding only ``iteration`` of ``source_root``."""
    os.makedirs(target_root, exist_ok=True)
    name = os.path.basename(layout.iteration_dir(source_root, iteration))
    shutil.copytree(os.path.join(source_root, name), os.path.join(target_root, name))
    layout.write_tracker(target_root, iteration)
    return target_root


def tracker(root: str) -> Optional[int]:
    return layout.read_tracker(root)[0]


def wait_for_line(process: subprocess.Popen, pattern: "re.Pattern", seen: List[str], timeout: float) -> "re.Match":
    """Read ``process``'s output line by line (kept in ``seen``) until ``pattern`` matches."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError("the run ended early:\n" + "".join(seen[-60:]))
        seen.append(line)
        match = pattern.search(line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern.pattern!r} within {timeout} s:\n" + "".join(seen[-60:]))


def unshare_available() -> Optional[str]:
    """None when a private tmpfs can be mounted (``unshare -rm``), else why not."""
    if shutil.which("unshare") is None:
        return "no unshare binary"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"
    return None


def run_on_small_disk(mountpoint: str, size: str, steps: List[List[str]]) -> List[Finished]:
    """Run each flag list in turn with a ``size`` tmpfs mounted on ``mountpoint`` (in a
    private mount namespace: nothing outside sees it, and it vanishes afterwards)."""
    import shlex

    script = [f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(mountpoint)} || exit 99"]
    for index, flags in enumerate(steps):
        script.append(f"echo '=== step {index}'; {shlex.join(command(flags))} 2>&1; echo \"=== rc $?\"")
    script.append(f"echo '=== listing'; ls -a {shlex.quote(mountpoint)}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(script)], cwd=REPO_ROOT, env=environment(),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S * len(steps))
    assert done.returncode == 0, f"tmpfs script failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr}"
    parts = re.split(r"^=== step \d+$", done.stdout, flags=re.MULTILINE)[1:]
    results = []
    for part in parts:
        body, _, rest = part.partition("=== rc ")
        results.append(Finished(int(rest.split()[0]), body))
    results.append(Finished(0, done.stdout.split("=== listing", 1)[1]))
    return results
