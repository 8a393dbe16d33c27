"""lowbit's GPTQ format against the real GPTQModel (gptqmodel 7.6.0): PASS or FAIL.

Sets up GPTQModel's venv (bench/peers/venv.py, shared with the other GPTQModel benchmarks; a few
minutes the first time), runs tests/formats/test_gptqmodel_compat.py there with lowbit from this
checkout on PYTHONPATH, and prints what each check found: GPTQModel's packer writing lowbit's words,
lowbit's layers and checkpoints running in GPTQModel (weights bit for bit, outputs within float16's
error), and checkpoints GPTQModel's own quantizer wrote, loaded by lowbit.

    python bench/gptq_compat.py [--json bench/out/gptq_compat.json] [-- extra pytest args]

Exit status 0 when every check passed (skips allowed, and listed), 1 otherwise; when GPTQModel
cannot be installed or imported here, the reason is printed and the status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from awq_compat import read_junit, summary  # noqa: E402  (the same JUnit reading and worst-case summary)
from peers.venv import TORCH_PIN, ensure_venv  # noqa: E402

# Shared with the other GPTQModel benchmarks: the same name and requirements, or ensure_venv rebuilds it.
VENV = "gptqmodel"
REQUIREMENTS = ["gptqmodel==7.6.0"]
TEST_FILE = "tests/formats/test_gptqmodel_compat.py"
# GPTQModel on CPU: its worker pool needs a size here; torch.compile of its dequantization costs
# minutes on CPU and changes no number this checks.
ENV = {"GPTQMODEL_CPU_WORKERS": "2", "TORCH_COMPILE_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def ensure_pytest(python: Path) -> None:
    """pytest in the shared venv, installed beside GPTQModel without touching its requirements."""
    if subprocess.run([str(python), "-c", "import pytest"], capture_output=True).returncode == 0:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as c:
        c.write(TORCH_PIN + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", c.name, "pytest"],
                   check=True)
    os.unlink(c.name)


def gptqmodel_problem(python: Path) -> str | None:
    """Why GPTQModel cannot run here, or None."""
    env = {**os.environ, **ENV}
    r = subprocess.run([str(python), "-c", "import gptqmodel; print(gptqmodel.__version__)"], capture_output=True,
                       text=True, env=env)
    if r.returncode:
        tail = [line for line in r.stderr.strip().splitlines() if line.strip()][-1:] or ["(no message)"]
        return f"`import gptqmodel` failed in {python}: {tail[0]}"
    return None


def run_tests(python: Path, junit: Path, extra: list[str]) -> int:
    env = {**os.environ, **ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", TEST_FILE, f"--junitxml={junit}",
           "-o", "junit_family=xunit1",  # keeps the measurements (record_property) in the XML
           "-W", "ignore::DeprecationWarning", *extra]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the per-test results and measurements here")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    a = ap.parse_args(argv)

    try:
        python = ensure_venv(VENV, REQUIREMENTS)
        ensure_pytest(python)
    except subprocess.CalledProcessError as e:
        print(f"FAIL: GPTQModel's venv could not be set up ({' '.join(map(str, e.cmd))} exited with {e.returncode})")
        return 1
    problem = gptqmodel_problem(python)
    if problem:
        print(f"FAIL: {problem}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        rc = run_tests(python, junit, a.pytest_args)
        if not junit.exists():
            print(f"FAIL: pytest exited with {rc} before writing results")
            return 1
        result = read_junit(junit)
    cases = result["cases"]
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    ok = rc == 0 and counts["failed"] == counts["error"] == 0 and counts["passed"] > 0

    print(f"\nGPTQModel compatibility ({', '.join(REQUIREMENTS)}, CPU)")
    print(f"  {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
          f"{counts['skipped']} skipped")
    for c in cases:
        if c["outcome"] != "passed":
            print(f"  {c['outcome'].upper():8} {c['test']}: {c['detail']}")
    print("measurements (max |difference|; 'fp16 bound' = fraction of GPTQModel's float16 error bound used):")
    for line in summary(cases):
        print(line)
    print("PASS" if ok else "FAIL")
    if a.json:
        from lowbit.formats import atomic_file

        result.update(passed=ok, counts=counts, venv=str(python), requirements=REQUIREMENTS)
        with atomic_file(a.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
