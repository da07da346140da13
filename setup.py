"""Build the compiled core: cythonize fastim/_core.pyx (which includes fastim/core/*.pxi).

Options, as uvloop's setup.py has them:
    python setup.py build_ext --inplace --cython-annotate     # HTML of where C calls Python
    FASTIM_DEBUG=1 pip install -e .                            # -O0 -g, bounds checks on
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTIM_DEBUG") == "1"
ANNOTATE = os.environ.get("FASTIM_ANNOTATE") == "1"

extra_compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]
directives = {"language_level": "3", "embedsignature": True}
if DEBUG:
    directives.update(boundscheck=True, wraparound=True)

extensions = [
    Extension(
        "fastim._core",
        ["fastim/_core.pyx"],
        extra_compile_args=extra_compile_args,
        depends=[os.path.join("fastim", "core", f) for f in os.listdir(os.path.join("fastim", "core"))]
        if os.path.isdir(os.path.join("fastim", "core"))
        else [],
    )
]

setup(
    ext_modules=cythonize(
        extensions, compiler_directives=directives, annotate=ANNOTATE, quiet=True
    ),
)
