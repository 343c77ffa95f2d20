"""Every HTML page tether writes, from one place: the detox/eval report, the hacking demo, the
CAI comparison and `tether compare`.

One jinja2 environment renders them all, with autoescape on (a prompt, a completion or a run
name is text, never markup) and undefined names as errors; `templates/base.html.j2` holds the
one stylesheet, `templates/guard.html.j2` the guard section that two pages share. Plots are
embedded as PNG data URIs, so every page is one self-contained file.
"""

from __future__ import annotations

import base64
import io
from functools import cache
from typing import Any

import jinja2


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tether", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **context: Any) -> str:
    """The page `templates/<template>` filled with `context`."""
    return _environment().get_template(template).render(**context)


def png_data_uri(fig: Any) -> str:
    """A matplotlib figure as an embeddable PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
