"""Plant known bugs in a copy of the checkout, one at a time, and check that the suite catches each.

Each mutant replaces one exact snippet of a product module (it must occur exactly once) and names
the tests that should kill it. The copy holds the tracked and untracked (not ignored) files of
this checkout, so uncommitted work is included; the checkout itself is never modified. The copy
runs with this checkout's interpreter and PYTHONPATH pointing at the copy, so the tests and the
processes they start import the mutated code.

    scripts/mutation_check.sh                  # every mutant, then a table
    scripts/mutation_check.sh --list           # what is planted where
    scripts/mutation_check.sh --only resume-skips-trainer-state allocator-rate-inversion

A mutant is "killed" when its tests fail, "survived" when they pass. Before the mutants, the
selected tests run once unmutated and must pass (else a failure would prove nothing). Exit
status: 0 when every mutant was killed, 1 otherwise. Not part of CI: it takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1200


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``old`` -> ``new`` in ``path``; ``tests`` are pytest arguments that should fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


MUTANTS = (
    # -- the four bugs the audit planted that survived or were caught by chance
    Mutant("allocator-rate-inversion", "allocator/power.py",
           "power = np.expm1(rate_bps * LN2 / w) / gamma", "power = np.exp(rate_bps * LN2 / w) / gamma",
           ("tests/test_allocator_blocks.py", "tests/test_allocator_bcd.py"),
           "2^x instead of 2^x - 1 when inverting the Shannon rate for power"),
    Mutant("resume-skips-trainer-state", "server_runtime/daemon.py",
           "        self.trainer.load(state.model, state.optimizer)\n", "",
           ("tests/test_server.py", "-k", "resume"),
           "--resume keeps the fresh weights instead of loading the checkpoint"),
    Mutant("onnx-backend-imports-torch", "edge_runtime/backends/onnx_backend.py",
           "        session = self._sessions.get(signature)\n",
           "        import torch  # noqa: F401\n        session = self._sessions.get(signature)\n",
           ("tests/test_device_loop.py", "-k", "onnx"),
           "the ONNX Runtime backend imports torch when it runs a graph"),
    Mutant("reanswer-crashes", "server_runtime/daemon.py",
           "            self.counters[\"reanswered_steps\"] += 1\n",
           "            self.counters[\"reanswered_steps\"] += 1\n            raise RuntimeError(\"planted\")\n",
           ("tests/test_server_failures.py", "-k", "resent_step"),
           "the server's re-answer of a re-sent step raises"),
    Mutant("resend-crashes", "server_runtime/daemon.py",
           "    def _resend(self, reply: p.Gradient) -> None:\n",
           "    def _resend(self, reply: p.Gradient) -> None:\n        raise RuntimeError(\"planted\")\n",
           ("tests/test_server_failures.py", "-k", "resent_step"),
           "the worker that sends a re-answered gradient raises"),
    # -- the same kinds of bug in the other modules the suite must guard
    Mutant("litert-backend-imports-torch", "edge_runtime/backends/litert_backend.py",
           "        names = self._io[sig]\n", "        import torch  # noqa: F401\n        names = self._io[sig]\n",
           ("tests/test_device_loop.py", "-k", "litert"),
           "the LiteRT backend imports torch when it runs a signature"),
    Mutant("quantizer-rounds-to-nearest", "edge_runtime/quantize.py",
           "scaled += np.float32(0.5) if noise is None else np.asarray(noise, np.float32).reshape(groups, -1)",
           "scaled += np.float32(0.5)",
           ("tests/test_quantize.py",),
           "the reference quantizer ignores its noise (biased rounding)"),
    Mutant("quantizer-step-size", "edge_runtime/quantize.py",
           "return ((hi - lo) / np.float32(2**bits - 1)).astype(np.float32)",
           "return ((hi - lo) / np.float32(2**bits)).astype(np.float32)",
           ("tests/test_quantize.py",),
           "delta = (hi - lo) / 2^q instead of / (2^q - 1)"),
    Mutant("torch-quantizer-step-size", "server_runtime/quantize_torch.py",
           "return (hi - lo) / torch.full_like(hi, float(2**bits - 1))",
           "return (hi - lo) / torch.full_like(hi, float(2**bits))",
           ("tests/test_quantize_torch.py",),
           "the torch twin's step size drifts from the reference"),
    Mutant("fedavg-unweighted", "server_runtime/aggregate.py",
           "weights = [n / total for n in num_samples]", "weights = [1.0 / len(num_samples) for _ in num_samples]",
           ("tests/test_aggregate.py",),
           "FedAvg ignores sample counts"),
    Mutant("bandwidth-kkt-marginal", "allocator/bandwidth.py",
           "* data.bits * LN2) - 2.0 * np.log(data.snr_hz)", "* data.bits * LN2) - 1.0 * np.log(data.snr_hz)",
           ("tests/test_allocator_blocks.py", "-k", "bandwidth or kkt"),
           "the KKT bandwidth block equalizes a wrong marginal energy (c^-1 instead of c^-2)"),
    Mutant("run-state-drops-rng", "server_runtime/run_state.py",
           "    if \"torch\" in rng:\n        torch.set_rng_state(rng[\"torch\"])\n", "",
           ("tests/test_run_state.py",),
           "restoring a checkpoint leaves torch's RNG where it was"),
    Mutant("numpy-backend-drops-momentum", "edge_runtime/backends/numpy_backend.py",
           "new_mw = _F32(momentum) * momentum_weight + grad_weight", "new_mw = grad_weight",
           ("tests/test_export_onnx.py", "tests/test_device_loop.py"),
           "the numpy reference train_step forgets its weight momentum"),
    Mutant("device-never-resends", "edge_runtime/device.py",
           "if reconnected or time.monotonic() - sent_at > self.resend_after_s:", "if False:",
           ("tests/test_device_loop.py", "-k", "reconnect"),
           "the device waits for a gradient lost in a reconnect instead of sending its step again"),
    Mutant("codec-skips-crc", "edge_runtime/protocol/codec.py",
           "    if zlib.crc32(view[:frame_len]) != crc:", "    if False:",
           ("tests/test_protocol_errors.py",),
           "decode accepts frames whose CRC-32 does not match"),
    Mutant("avg-pool-includes-class-token", "server_runtime/vit.py",
           "pooled = features[:, self.config.num_prefix_tokens :].mean(dim=1)", "pooled = features.mean(dim=1)",
           ("tests/test_checkpoint_layouts.py",),
           "average pooling takes the class token into the mean (timm leaves it out)"),
    Mutant("headless-head-not-zeroed", "server_runtime/checkpoint.py",
           "        model.reset_head(model.num_classes)\n", "",
           ("tests/test_checkpoint_layouts.py", "-k", "headless"),
           "a headless checkpoint keeps the random init head instead of a fresh zero one"),
)


def copy_checkout(into: Path) -> None:
    """Tracked and untracked (not ignored) files of the checkout, as they are now."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.split(b"\0")
    for raw in filter(None, listed):
        name = raw.decode()
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[bool, list[str], float, str]:
    """(passed, failing test ids, seconds, output) of pytest on ``tests`` in ``copy``."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, [f"(timed out after {TIMEOUT_S} s)"], time.monotonic() - start, ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.MULTILINE)
    if done.returncode != 0 and not failed:
        failed = [done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"exit {done.returncode}"]
    return done.returncode == 0, failed, time.monotonic() - start, done.stdout + done.stderr


def check_imports_come_from(copy: Path) -> None:
    """Refuse to go on if the copy's modules would not be the ones imported (an installed sflam first)."""
    probe = "import server_runtime, edge_runtime; print(server_runtime.__file__); print(edge_runtime.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)},
                         check=True, capture_output=True, text=True).stdout.split()
    if not all(Path(path).is_relative_to(copy) for path in out):
        raise SystemExit(f"the copy's packages are not the ones imported ({out}); cannot plant mutants")


def plant(copy: Path, mutant: Mutant) -> str:
    """Apply ``mutant`` in ``copy``; returns the original text to restore."""
    path = copy / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.name}: the snippet occurs {count} times in {mutant.path} (needs exactly 1); "
                         "update the mutant to the code")
    path.write_text(text.replace(mutant.old, mutant.new))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    args = parser.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"unknown mutant(s) {', '.join(unknown)}; --list shows them")
        mutants = tuple(m for m in MUTANTS if m.name in args.only)
    if args.list:
        for m in mutants:
            print(f"{m.name:32} {m.path:42} {m.what}\n{'':32} tests: {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="sflam-mutants-") as tmp:
        copy = Path(tmp)
        copy_checkout(copy)
        check_imports_come_from(copy)
        if not args.no_baseline:
            selected = tuple(dict.fromkeys(t for m in mutants for t in m.tests if t.startswith("tests/")))
            print(f"baseline: {len(selected)} test file(s) unmutated ...", flush=True)
            passed, failed, seconds, output = run_tests(copy, selected)
            if not passed:
                print(output[-6000:])
                print(f"the unmutated tests fail ({', '.join(failed)}): fix them first")
                return 2
            print(f"baseline passed in {seconds:.0f} s", flush=True)
        rows = []
        for m in mutants:
            original = plant(copy, m)
            try:
                passed, failed, seconds, _ = run_tests(copy, m.tests)
            finally:
                (copy / m.path).write_text(original)
            verdict = "survived" if passed else "killed"
            rows.append((m, verdict, failed, seconds))
            print(f"{verdict:8}  {m.name:32} {seconds:6.0f} s  {failed[0] if failed else '-'}", flush=True)
    killed = sum(verdict == "killed" for _, verdict, _, _ in rows)
    print(f"\n{killed} of {len(rows)} mutants killed")
    for m, verdict, failed, _ in rows:
        if verdict == "survived":
            print(f"  SURVIVED {m.name}: {m.what} ({m.path}); tests run: {' '.join(m.tests)}")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
