"""lowbit's AutoAWQ format against the real AutoAWQ (autoawq 0.2.9): PASS or FAIL.

Sets up AutoAWQ's own venv (bench/peers/venv.py; a few minutes the first time), runs
tests/formats/test_autoawq_compat.py there with lowbit from this checkout on PYTHONPATH, and prints
what each check found: bit-exact weights both ways, output differences of lowbit's modules against
AutoAWQ's on the same inputs, and a checkpoint AutoAWQ's own quantizer wrote, loaded by lowbit.

    python bench/awq_compat.py [--json bench/out/awq_compat.json] [-- extra pytest args]

Exit status 0 when every check passed (skips allowed, and listed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from peers.venv import ensure_venv  # noqa: E402

# A venv of its own: another bench may hold an "autoawq" venv with other requirements, and
# ensure_venv rebuilds a venv whose requirements change.
VENV = "autoawq-compat"
REQUIREMENTS = ["autoawq==0.2.9", "pytest"]
TEST_FILE = "tests/formats/test_autoawq_compat.py"


def run_tests(python: Path, junit: Path, extra: list[str]) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", TEST_FILE, f"--junitxml={junit}",
           "-o", "junit_family=xunit1",  # keeps the measurements (record_property) in the XML
           "-W", "ignore::DeprecationWarning", "-W", "ignore:Using naive", *extra]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def read_junit(junit: Path) -> dict:
    cases = []
    for tc in ET.parse(junit).iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (el.get("message") or "").splitlines()[0] if el.get("message") else ""
        props = {p.get("name"): float(p.get("value")) for p in tc.iter("property")}
        cases.append({"test": tc.get("name"), "outcome": outcome, "detail": detail, "properties": props})
    return {"cases": cases}


def summary(cases: list[dict]) -> list[str]:
    """One line per kind of measurement: the worst value over the configurations tested."""
    worst: dict[str, tuple[float, str, int]] = {}
    for c in cases:
        for name, v in c["properties"].items():
            # "lowbit->autoawq gemm g32 bias=True max|...|" -> direction and measurement, config apart
            key = re.sub(r" (g-?\d+|bias=\w+)(?= )", "", name)
            config = " ".join(re.findall(r"(?<= )(?:g-?\d+|bias=\w+)(?= )", name))
            v0, c0, n = worst.get(key, (float("-inf"), "", 0))
            worst[key] = (v, config, n + 1) if v > v0 else (v0, c0, n + 1)
    return [f"  {k:<66} {v:<10.4g}" + (f" (worst of {n}: {config})" if n > 1 else "")
            for k, (v, config, n) in sorted(worst.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the per-test results and measurements here")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    a = ap.parse_args(argv)

    python = ensure_venv(VENV, REQUIREMENTS)
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

    print("\nAutoAWQ compatibility (autoawq 0.2.9, CPU)")
    print(f"  {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
          f"{counts['skipped']} skipped")
    for c in cases:
        if c["outcome"] != "passed":
            print(f"  {c['outcome'].upper():8} {c['test']}: {c['detail']}")
    print("measurements (max |difference|; 'fp16 bound' = fraction of AutoAWQ's float16 error bound used):")
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
