"""What an inspection shows: aggregates over samples, a terminal table, a self-contained
HTML page (every model-written string escaped) and a PNG chart."""

from __future__ import annotations

import base64
import html
import unicodedata
from collections import Counter

from hrpo.inspect.scripts import NON_LETTER, cross_lingual, text_script
from hrpo.inspect.trace import Trace
from hrpo.training.plots import integer_ticks, png, pyplot


def visible(text: str) -> str:
    """Whitespace and control characters made visible, so every token shows as something."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("␣")
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) or "∅"


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def summary(values: list[float]) -> dict:
    """n, mean and quantiles (nearest rank) of `values`; only n when there are none."""
    if not values:
        return {"n": 0}
    v = sorted(values)

    def q(f):
        return v[round(f * (len(v) - 1))]

    return {
        "n": len(v),
        "mean": sum(v) / len(v),
        "min": v[0],
        "p10": q(0.1),
        "median": q(0.5),
        "p90": q(0.9),
        "max": v[-1],
    }


def aggregates(traces: list[Trace]) -> dict:
    """Gate coefficients (over blended positions), completion lengths, and the scripts of the
    tokens nearest to the latents of thinking positions. cross_lingual_share: of those nearest
    tokens written in letters, the share in a script other than their prompt's main one
    (prompts without letters do not count)."""
    scripts, other, letters = Counter(), 0, 0
    for t in traces:
        near = [tok for p in t.positions if p.thinking for tok, _ in p.nearest]
        scripts.update(map(text_script, near))
        main = text_script(t.prompt)
        if main not in NON_LETTER:
            o, n = cross_lingual(near, main)
            other, letters = other + o, letters + n
    width = max((len(t.positions) for t in traces), default=0)
    by_position = []
    for i in range(width):
        gates = [t.positions[i].gate for t in traces if i < len(t.positions) and t.positions[i].gate is not None]
        by_position.append(sum(gates) / len(gates) if gates else None)
    total = sum(scripts.values())
    return {
        "samples": len(traces),
        "gate": summary([p.gate for t in traces for p in t.positions if p.gate is not None]),
        "gate_per_sample": summary([t.gate_mean for t in traces if t.gate_mean is not None]),
        "completion_tokens": summary([len(t.positions) for t in traces]),
        "thinking_tokens": summary([sum(p.thinking for p in t.positions) for t in traces]),
        "reached_marker": sum(any(not p.thinking for p in t.positions) for t in traces) / max(len(traces), 1),
        "prompt_scripts": dict(Counter(text_script(t.prompt) for t in traces).most_common()),
        "nearest_scripts": {s: n / total for s, n in scripts.most_common()},
        "nearest_tokens_counted": total,
        "cross_lingual_share": other / letters if letters else None,
        "gate_by_position": by_position,
    }


def _gate(g: float | None) -> str:
    return "" if g is None else f"{g:.6f}"


def _nearest(p, sep: str = ", ") -> str:
    return sep.join(f"{visible(tok)} {sim:.2f}" for tok, sim in p.nearest)


def _mixed(p, sep: str = ", ") -> str:
    return sep.join(f"{visible(tok)} {w:.2f}" for tok, w in p.mixed)


def terminal(trace: Trace, index: int, max_rows: int) -> str:
    pos = trace.positions
    lines = [
        f"sample {index}: {clip(visible(trace.prompt), 100)}",
        f"  completion: {clip(visible(''.join(p.token for p in pos)), 100)}",
        f"  {len(pos)} tokens, {sum(p.thinking for p in pos)} thinking, gate mean {_gate(trace.gate_mean) or '-'}"
        + "".join(f", recorded {k} {v}" for k, v in trace.recorded.items()),
        f"  {'pos':>4}  {'token':<16} T  {'gate':>8}  nearest to h_hat (cosine)  [input mixed (weight)]",
    ]
    for i, p in enumerate(pos[:max_rows]):
        lines.append(
            f"  {i:>4}  {clip(visible(p.token), 16):<16} {'T' if p.thinking else ' '}  "
            f"{_gate(p.gate):>8}  {_nearest(p)}" + (f"  [{_mixed(p)}]" if p.mixed and p.thinking else "")
        )
    if not pos:
        lines.append("        (empty completion)")
    if len(pos) > max_rows:
        lines.append(f"  ... {len(pos) - max_rows} more positions (all of them in --html and --json)")
    return "\n".join(lines)


def terminal_aggregates(agg: dict) -> str:
    def stats(s):
        if not s["n"]:
            return "none"
        return ", ".join(f"{k} {s[k]:.6f}" for k in ("mean", "p10", "median", "p90"))

    scripts = ", ".join(f"{s} {share:.0%}" for s, share in agg["nearest_scripts"].items()) or "none"
    cl = agg["cross_lingual_share"]
    length = agg["completion_tokens"]
    return "\n".join(
        [
            f"aggregates over {agg['samples']} samples:",
            f"  gate coefficient (blended positions): {stats(agg['gate'])}",
            f"  completion tokens: mean {length.get('mean', 0):.1f}, min {length.get('min', 0)}, "
            f"max {length.get('max', 0)}; "
            f"reached the marker: {agg['reached_marker']:.0%}",
            f"  scripts of nearest tokens (thinking positions): {scripts}",
            f"  cross-lingual share: {'n/a' if cl is None else f'{cl:.1%}'} (prompt scripts: "
            + ", ".join(f"{s} {n}" for s, n in agg["prompt_scripts"].items())
            + ")",
        ]
    )


def chart(traces: list[Trace], agg: dict) -> bytes:
    """PNG: the gate coefficient over positions (each sample and the mean), script shares."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.6))
    for t in traces:
        points = [(i, p.gate) for i, p in enumerate(t.positions) if p.gate is not None]
        if points:
            left.plot(*zip(*points), lw=0.6, alpha=0.35, color="tab:blue")
    mean = [(i, g) for i, g in enumerate(agg["gate_by_position"]) if g is not None]
    if mean:
        left.plot(*zip(*mean), lw=1.8, color="tab:red", label="mean over samples")
        left.legend(fontsize=7)
    left.set_title("gate coefficient (mean of a over channels)")
    left.set_xlabel("completion position")
    integer_ticks(left.xaxis)  # positions are tokens
    left.set_ylabel("gate coefficient")
    left.ticklabel_format(axis="y", style="plain", useOffset=False)
    left.grid(alpha=0.3)
    shares = agg["nearest_scripts"]
    right.barh(list(shares)[::-1], [100 * v for v in shares.values()][::-1], color="tab:green")
    right.set_title("scripts of nearest tokens (thinking positions)")
    right.set_xlabel("% of nearest tokens")
    right.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return png(fig, 100)


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:70em;color:#111}
.tokens{font-family:ui-monospace,monospace;line-height:2;word-break:break-all}
.t{padding:1px 2px;margin:0 1px;border-radius:3px}
.think{border-bottom:2px solid #2563eb}
.ans{background:#fde68a;border-bottom:2px dashed #b45309}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
td.m{font-family:ui-monospace,monospace}.bar{background:#16a34a;height:.8em;display:inline-block}
.sample{border-top:1px solid #ccc;margin-top:1.5em}
"""


def html_page(traces: list[Trace], agg: dict, title: str, png: bytes | None = None) -> str:
    """One file, no scripts or external assets; every string a model or a user wrote is escaped."""
    e = lambda s: html.escape(str(s), quote=True)  # noqa: E731
    lo, hi = agg["gate"].get("min"), agg["gate"].get("max")

    def shade(g):  # lower a lets more of h_hat into the input: darker blue
        x = 0.5 if hi == lo else (hi - g) / (hi - lo)
        return f' style="background:rgba(37,99,235,{0.1 + 0.6 * x:.3f})"'

    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{STYLE}</style>"
        f"</head><body><h1>{e(title)}</h1>",
        "<p>Thinking tokens are underlined blue and shaded by their gate coefficient (the mean over channels "
        f"of a): darkest at the lowest ({_gate(lo) or '-'}), lightest at the highest ({_gate(hi) or '-'}); a lower "
        "a lets more of the latent into the next input. Answer tokens (from the marker on) are amber. Hover a "
        "token for the tokens nearest to its latent.</p>",
        "<h2>Aggregates</h2><table>",
    ]
    rows = [
        ("samples", agg["samples"]),
        ("reached the marker", f"{agg['reached_marker']:.0%}"),
        ("cross-lingual share", "n/a" if agg["cross_lingual_share"] is None else f"{agg['cross_lingual_share']:.1%}"),
        ("prompt scripts", ", ".join(f"{s} {n}" for s, n in agg["prompt_scripts"].items())),
    ]
    for key in ("gate", "gate_per_sample", "completion_tokens", "thinking_tokens"):
        rows.append((key.replace("_", " "), ", ".join(f"{k} {v:.5g}" for k, v in agg[key].items())))
    out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows]
    out.append("</table><h3>Scripts of the tokens nearest to thinking latents</h3><table>")
    out += [
        f"<tr><td>{e(s)}</td><td>{share:.1%}</td><td><span class='bar' style='width:{200 * share:.0f}px'></span>"
        "</td></tr>"
        for s, share in agg["nearest_scripts"].items()
    ]
    out.append("</table>")
    if png:
        out.append(f"<p><img alt='chart' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>")
    for n, t in enumerate(traces):
        recorded = "".join(f", recorded {e(k)} {e(v)}" for k, v in t.recorded.items())
        out.append(
            f"<div class='sample'><h2>Sample {n}</h2><p><b>Prompt:</b> {e(t.prompt)}</p>"
            f"<p>{len(t.positions)} tokens, gate mean {_gate(t.gate_mean) or '-'}{recorded}</p><p class='tokens'>"
        )
        for i, p in enumerate(t.positions):
            tip = f"pos {i}, gate {_gate(p.gate) or '-'}, nearest: {_nearest(p)}"
            cls, style = ("think", shade(p.gate) if p.gate is not None else "") if p.thinking else ("ans", "")
            out.append(f"<span class='t {cls}'{style} title='{e(tip)}'>{e(visible(p.token))}</span>")
        out.append(
            "</p><details><summary>positions</summary><table><tr><th>pos</th><th>token</th><th>thinking</th>"
            "<th>gate</th><th>nearest to h_hat (cosine)</th></tr>"
        )
        out += [
            f"<tr><td>{i}</td><td class='m'>{e(visible(p.token))}</td><td>{'T' if p.thinking else ''}</td>"
            f"<td>{_gate(p.gate)}</td><td class='m'>{e(_nearest(p, ' | '))}</td></tr>"
            for i, p in enumerate(t.positions)
        ]
        out.append("</table></details></div>")
    out.append("</body></html>")
    return "\n".join(out)


def as_json(traces: list[Trace], agg: dict) -> dict:
    return {
        "aggregates": agg,
        "samples": [
            {
                "prompt": t.prompt,
                "recorded": t.recorded,
                "gate_mean": t.gate_mean,
                "positions": [
                    {"token": p.token, "thinking": p.thinking, "gate": p.gate, "nearest": p.nearest, "mixed": p.mixed}
                    for p in t.positions
                ],
            }
            for t in traces
        ],
    }
