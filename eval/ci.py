"""CI outputs of a validation: JUnit XML (one test case per check) and a Markdown job summary."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from dsq.eval.gates import GateResult
from dsq.eval.report import Report
from dsq.eval.report_tables import format_terminal_table
from dsq.core.check import Check


def write_junit(path: Path, suite: str, checks: list[Check], gates: list[GateResult], report: Report | None) -> Path:
    """JUnit XML: one ``testcase`` per check and per gate; a failed one carries a ``failure``.

    Args:
        path: file to write.
        suite: test suite name (e.g. ``dsq validate runs/int4``).
        checks: integrity and other checks.
        gates: gate outcomes.
        report: the evaluation, printed into ``system-out`` when given.
    """
    cases = [("dsq.check", c.name, c.passed, c.message) for c in checks]
    cases += [(f"dsq.gate.{g.candidate}", g.gate, g.passed, g.message) for g in gates]
    failures = sum(not passed for *_, passed, _ in cases)
    root = ET.Element("testsuites", tests=str(len(cases)), failures=str(failures))
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(failures), errors="0")
    for classname, name, passed, message in cases:
        case = ET.SubElement(ts, "testcase", classname=classname, name=name)
        if not passed:
            ET.SubElement(case, "failure", message=message).text = message
        else:
            ET.SubElement(case, "system-out").text = message
    if report is not None:
        ET.SubElement(ts, "system-out").text = format_terminal_table(report)
    ET.indent(root)
    path.write_text(ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n")
    return path


def summary_markdown(title: str, checks: list[Check], gates: list[GateResult], report: Report | None) -> str:
    """A Markdown page for a CI job summary: verdict, checks, gates, and the metrics table."""
    passed = all(c.passed for c in checks) and all(g.passed for g in gates)
    lines = [f"## {title}: {'PASS' if passed else 'FAIL'}", ""]
    lines += ["| check | result | detail |", "|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.message} |")
    for g in gates:
        lines.append(f"| {g.gate} ({g.candidate}) | {'pass' if g.passed else '**FAIL**'} | {g.message} |")
    if not gates:
        lines.append("| gates | - | no gate was set |")
    if report is not None:
        lines += ["", "```", format_terminal_table(report), "```"]
    return "\n".join(lines) + "\n"
