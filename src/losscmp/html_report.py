"""The HTML report (``--html PATH``): one self-contained file for people who would rather
look than read.

In: the dict :func:`losscmp.report.audit_json` returns, the very record ``--json``
writes (one serializer; this module only renders it).  Out: a string of HTML with its
CSS inline and no script, font or image fetched from anywhere, so it opens offline and
can be mailed or attached to a CI run as it is.

Layout: the run's settings, the verdict table (one row per pair), the case tally, then
one section per finding: its sentence, the worst and the minimal example, the threshold,
diverging cases by regime as bars, the replay command, and the evidence under a
``<details>`` fold (a browser's own collapsible, no JavaScript).
"""
from __future__ import annotations

import html
import json
from typing import Any

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; } th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } .diverge { color: #b00020; font-weight: bold; } .agree { color: #1b7f3b; font-weight: bold; }
.partial { color: #a06000; font-weight: bold; }
code, pre { font: 13px/1.4 ui-monospace, monospace; background: #f6f6f6; }
pre { padding: .5em; white-space: pre-wrap; overflow-wrap: anywhere; }
.command { white-space: pre; overflow-x: auto; display: block; padding: .4em; user-select: all; }
.sentence { font-size: 1.05em; font-weight: 600; }
.bar { display: inline-block; height: .9em; background: #b00020; vertical-align: middle; }
dl.evidence dt { font-weight: bold; margin-top: .4em; } dl.evidence dd { margin-left: 1.5em; }
"""

# Keys of a finding shown in its own place above the evidence fold (``mismatch`` and
# ``minimize_step_records`` are ``detail`` and ``minimize_steps`` as fields: said once, in words).
SHOWN = {"pair", "alone", "kind", "score", "score_text", "cases", "regimes", "detail", "mismatch", "regime", "input", "explanation",
         "minimal", "threshold", "repro", "replay_command", "sentence", "minimize_step_records"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_html(report: dict[str, Any], title: str = "losscmp report") -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_e(title)}</title>\n"
             f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>"]
    parts.append(_settings(report))
    parts.append(_replayed(report))
    parts.append(_summary(report))
    for i, finding in enumerate(report.get("divergences", []), 1):
        parts.append(_finding(i, finding))
    for why in report.get("stage_errors", []):
        parts.append(f"<p class=\"partial\">warning: {_e(why)}</p>")
    parts.append("</body>\n</html>\n")
    # ASCII with character references: the page reads the same whatever encoding writes it.
    return "\n".join(parts).encode("ascii", "xmlcharrefreplace").decode("ascii")


def _settings(report: dict[str, Any]) -> str:
    tol = report.get("tolerance", {})
    rows = [("implementations", ", ".join(f"{la} = {report.get('references', {}).get(la, '')}" for la in report.get("implementations", []))),
            ("spec", report.get("spec")),
            ("cases", report.get("cases_run")),
            ("seed, dtype, device", f"{report.get('seed')}, {report.get('dtype')}, {report.get('device')}"),
            ("tolerance", f"rtol {tol.get('rtol')}, atol {tol.get('atol')}"),
            ("seconds", report.get("seconds"))]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table class=\"settings\">{body}</table>"


def _replayed(report: dict[str, Any]) -> str:
    """The saved cases replayed before the search, as the terminal lists them above its table:
    one that still diverges makes the run diverge whatever the table below says."""
    saved = report.get("replayed", [])
    if not saved:
        return ""
    rows = []
    for r in saved:
        now, css = ((f"still diverges ({r['kind']})", "diverge") if r["kind"]
                    else ("agrees now", "agree") if r["compared"] else ("not compared", "partial"))
        rows.append(f"<tr><td>{_e(r['path'])}</td><td>{_e(_subject(r['pair']))}</td><td>{_e(r['recorded'])}</td>"
                    f"<td class=\"{css}\">{_e(now)}</td><td>{_e(r['detail'] if r['kind'] or not r['compared'] else '')}</td></tr>")
    return (f"<h2>Saved cases replayed first ({len(saved)})</h2>\n<table>\n<tr><th>saved case</th><th>pair</th><th>saved as</th>"
            "<th>today</th><th>detail</th></tr>\n" + "\n".join(rows) + "\n</table>")


def _summary(report: dict[str, Any]) -> str:
    cases = report.get("cases_run", 0)
    rows = []
    for row in report.get("pairs", []):
        subject = _subject(row["pair"])
        if row["verdict"] == "diverge":
            verdict, css = "DIVERGE", "diverge"
            score = row.get("worst_score")  # a number, or "inf"/"nan" as the JSON writes them
            score = format(score, ".3g") if isinstance(score, (int, float)) else str(score)
            rows.append(f"<tr class=\"pair\"><td>{_e(subject)}</td><td class=\"{css}\">{verdict}</td>"
                        f"<td>{_e(row['diverging_cases'])} / {_e(cases)}</td><td>{_e(score)}</td>"
                        f"<td>{_e(', '.join(row['kinds']))}</td></tr>")
        else:
            partial = row["compared_cases"] < cases
            verdict = f"agree on {row['compared_cases']} compared" if partial else "agree"
            rows.append(f"<tr class=\"pair\"><td>{_e(subject)}</td><td class=\"{'partial' if partial else 'agree'}\">{_e(verdict)}</td>"
                        f"<td>0</td><td>-</td><td>-</td></tr>")
    table = ("<h2>Verdict</h2>\n<table class=\"summary\"><tr><th>pair</th><th>verdict</th><th>diverging cases</th>"
             "<th>worst score</th><th>kinds</th></tr>" + "".join(rows) + "</table>")
    tally = report.get("tally", {})
    counts = sorted(tally.items(), key=lambda kv: (kv[0] != "agree", -kv[1]))
    tally_html = "<ul class=\"tally\">" + "".join(f"<li data-what=\"{_e(w)}\" data-count=\"{_e(n)}\">{_e(n)} {_e(w)}</li>"
                                                  for w, n in counts) + "</ul>"
    skipped = "".join(f"<p class=\"partial\">not compared on {_e(nc['cases'])} case(s), {_e(_subject(nc['pair']))}: {_e(nc['why'])}</p>"
                      for nc in report.get("not_compared", []))
    return f"{table}\n<p>cases:</p>{tally_html}{skipped}"


def _subject(pair: list[str]) -> str:
    return pair[0] if pair[0] == pair[1] else f"{pair[0]} vs {pair[1]}"


def _finding(i: int, d: dict[str, Any]) -> str:
    out = [f"<section class=\"finding\" id=\"finding-{i}\" data-kind=\"{_e(d['kind'])}\" data-pair=\"{_e(json.dumps(d['pair']))}\" "
           f"data-cases=\"{_e(d.get('cases'))}\">",
           f"<h2>{_e(_subject(d['pair']))}: <span class=\"diverge\">{_e(d['kind'])}</span></h2>"]
    if d.get("explanation"):
        sentence = d["explanation"] if isinstance(d["explanation"], str) else d["explanation"].get("sentence", "")
        out.append(f"<p class=\"sentence\">{_e(sentence)}</p>")
    out.append(f"<h3>Worst of {_e(d.get('cases'))} case(s)</h3><p>{_e(d.get('input'))}, score {_e(d.get('score_text'))}</p>"
               f"<pre class=\"worst\">{_e(d.get('detail'))}</pre>")
    minimal = d.get("minimal")
    if minimal:
        sizes = ", ".join(f"{k}={v}" for k, v in (d.get("minimized_sizes") or {}).items())
        out.append(f"<h3>Minimal example ({_e(sizes)})</h3>")
        if minimal.get("detail"):
            out.append(f"<pre class=\"minimal\">{_e(minimal['detail'])}</pre>")
        out.append("<table class=\"inputs\">" + "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>"
                                                        for k, v in minimal.get("inputs", {}).items()) + "</table>")
    t = d.get("threshold")
    if t:
        agree, diverge, value = (format(t[k], ".4g") for k in ("agree_at", "diverge_at", "value"))
        if t.get("still_differ_at_agree"):  # the finding is gone there, but not every difference
            out.append(f"<p class=\"threshold\">threshold: {_e(t.get('text') or '')}</p>")
        else:
            out.append(f"<p class=\"threshold\">threshold: agree at {_e(t['knob'])} = {_e(agree)}, diverge at {_e(diverge)} "
                       f"(threshold {_e(value)})</p>")
    regimes = d.get("regimes") or {}
    if regimes:
        most = max(regimes.values())
        bars = "".join(f"<tr><td>{_e(r)}</td><td><span class=\"bar\" style=\"width:{max(2, round(12 * n / most))}em\"></span> {_e(n)}</td></tr>"
                       for r, n in sorted(regimes.items(), key=lambda kv: -kv[1]))
        out.append(f"<h3>Diverging cases by regime</h3><table class=\"regimes\">{bars}</table>")
    sites = _sites(d)
    if sites:  # both source lines side by side: where the two executions part ways
        head = "".join(f"<th>{_e(label)}</th>" for label in sites)
        cells = "".join(f"<td><code>{_e(site.get('file'))}:{_e(site.get('line'))}</code><pre>{_e(site.get('code', ''))}</pre>"
                        f"<small>{_e(site.get('op', ''))}</small></td>" for site in sites.values())
        out.append(f"<h3>First differing operation</h3><table class=\"location\"><tr>{head}</tr><tr>{cells}</tr></table>")
    if d.get("replay_command"):
        out.append(f"<h3>Replay</h3><code class=\"command\">{_e(d['replay_command'])}</code>")
    evidence = {k: v for k, v in d.items() if k not in SHOWN and v not in (None, [], {}, "")}
    if isinstance(d.get("explanation"), dict):  # a record that nests the explanation under its own key
        evidence.update({k: v for k, v in d["explanation"].items() if k != "sentence" and v not in (None, [], {}, "")})
    if evidence:
        out.append("<details><summary>Evidence</summary>" + _definitions(evidence, "evidence") + "</details>")
    out.append("</section>")
    return "\n".join(out)


def _sites(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{label: {file, line, code, op}} of the finding's location, wherever the record keeps it."""
    explanation: dict[str, Any] = d["explanation"] if isinstance(d.get("explanation"), dict) else {}
    location = d.get("location") or explanation.get("location")
    if not isinstance(location, dict):
        return {}
    return {label: site for label, site in location.items() if isinstance(site, dict) and "file" in site}


def _definitions(data: dict[str, Any], css: str = "") -> str:
    """Nested JSON as nested definition lists: every field shown, none interpreted here."""
    items = []
    for key, value in data.items():
        items.append(f"<dt>{_e(key.replace('_', ' '))}</dt><dd>{_value(value)}</dd>")
    return f"<dl class=\"{css}\">{''.join(items)}</dl>"


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return _definitions(value)
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return "<ul>" + "".join(f"<li>{_e(v)}</li>" for v in value) + "</ul>"
        return "<ol>" + "".join(f"<li>{_value(v)}</li>" for v in value) + "</ol>"
    return _e("null" if value is None else value)
