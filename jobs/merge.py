"""The merge job's report: JSON + a PNG of the spectra and kept ranks per layer, beside the merged file.

The merge itself is :func:`medlego.runtime.adapter_merge.merge_adapters` (the server runs it too).
"""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: str | Path) -> tuple[Path, Path | None]:
    """<out>.report.json and <out>.report.png (spectra and kept rank per layer)."""
    out = Path(out)
    js = out.with_suffix(".report.json")
    js.write_text(json.dumps(report, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return js, None
    names = list(report["matrices"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        spec = report["matrices"][name]["spectrum"]
        if spec:
            ax1.semilogy(range(1, len(spec) + 1), [max(s, 1e-12) for s in spec], alpha=0.5,
                         color="tab:blue" if name.endswith(".q") else "tab:orange")
    ax1.set(xlabel="singular value index", ylabel="singular value", title=f"{report['method']}: spectra (Q blue, V orange)")
    blocks = sorted({int(n.split(".")[1]) for n in names})
    for target, color in (("q", "tab:blue"), ("v", "tab:orange")):
        ax2.plot(blocks, [report["matrices"][f"blocks.{b}.{target}"]["rank"] for b in blocks], marker="o",
                 color=color, label=target.upper())
    ax2.set(xlabel="block", ylabel="kept rank", title="kept rank per layer")
    ax2.legend()
    fig.tight_layout()
    png = out.with_suffix(".report.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return js, png
