"""Build hook: the cffi extension modules (KVM binding, Unicorn fast paths) compile at install."""

from setuptools import setup

setup(cffi_modules=[
    "replayvm/engines/kvm_build.py:ffibuilder",
    "replayvm/engines/emu_build.py:ffibuilder",
])
