"""Build step of pyflannel: the udp backend's C fast path as an optional extension module.

Everything else (metadata, packages, entry points) is in setup.cfg. The fast path is a plain C
file that the udp backend loads with ctypes from the installed package
(``flannel/backends/udp/_fastpath.<abi>.so``); it is built here, at install time, never by the
daemon. ``optional=True``: without a C compiler the install still succeeds (setuptools prints
why) and the agent runs the pure-Python data path, saying so at start and in ``flannel --version``.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "flannel.backends.udp._fastpath",
            sources=["backends/udp/_accel/fastpath.c"],
            extra_compile_args=["-O3", "-fvisibility=default"],
            optional=True,
        ),
    ],
)
