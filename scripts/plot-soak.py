"""Draws bench/soak.png from bench/soak.csv (make soak)."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

path = sys.argv[1] if len(sys.argv) > 1 else "bench/soak.csv"
rows = list(csv.DictReader(open(path)))
t = [float(r["at_s"]) / 60 for r in rows]
panels = [
    ("requests/s", ["requests_per_s"]),
    ("p99 (ms)", ["p99_ms"]),
    ("memory (MiB)", ["envoy_rss_mib", "envoy_heap_mib", "control_plane_rss_mib"]),
    ("Redis keys, audit queue, live tokens", ["redis_keys", "audit_queue", "tokens_live"]),
]
fig, axes = plt.subplots(len(panels), 1, figsize=(9, 10), sharex=True)
for ax, (title, cols) in zip(axes, panels):
    for c in cols:
        ax.plot(t, [float(r[c]) for r in rows], label=c)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
axes[-1].set_xlabel("minutes")
fig.tight_layout()
out = path.replace(".csv", ".png")
fig.savefig(out, dpi=90)
print(f"wrote {out}")
