# Licensed under a 3-clause BSD style license - see licenses/LICENSE.rst
"""Sphinx configuration for the starnet documentation.

Build with::

    sphinx-build -W -b html -D disable_intersphinx=1 docs docs/_build/html

``-D disable_intersphinx=1`` (a setting of sphinx-astropy's
``intersphinx_toggle`` extension) builds without network access.
"""

from importlib import metadata

from sphinx_astropy.conf.v2 import *  # noqa: F401, F403
from sphinx_astropy.conf.v2 import intersphinx_mapping

# -- Project information -----------------------------------------------------

project = "starnet"
author = "The starnet developers"
copyright = f"2026, {author}"

try:
    release = metadata.version(project)
except metadata.PackageNotFoundError:  # building from a source tree on sys.path
    from starnet import __version__ as release

# The short X.Y version.
version = ".".join(release.split(".")[:2])

# -- General configuration ---------------------------------------------------

intersphinx_mapping.update({
    "photutils": ("https://photutils.readthedocs.io/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
})

# Inheritance diagrams need Graphviz, which is not a Python dependency.
automodapi_inheritance_diagram = False

# -- Options for HTML output -------------------------------------------------

html_title = f"{project} v{release}"
htmlhelp_basename = f"{project}doc"
