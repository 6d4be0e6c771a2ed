"""JupyterLab settings of ``./workbook.sh lab`` (and of the browser test, which starts Lab the same way).

Loaded with ``jupyter lab --config tools/jupyter_lab_config.py``; everything else is JupyterLab's default
(comms over subshells included: the planner widget is built to draw right under it).
"""

import os

from jupyter_server.services.contents.manager import ContentsManager

c = get_config()  # noqa: F821  (defined by Jupyter when it loads this file)

# The file browser lists each notebook once: the jupytext sources (notebooks/NN_*.py) are for
# maintainers, who edit them in an editor; Lab's own hidden patterns are kept.
c.ContentsManager.hide_globs = ContentsManager.hide_globs.default() + ["[0-9][0-9]_*.py"]
# No call home: the machine may be offline (the workbook never needs a network).
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
# As root (a container, a rented GPU box), Lab refuses to start unless told; workbook.sh says so in one line.
if hasattr(os, "getuid") and os.getuid() == 0:
    c.ServerApp.allow_root = True
