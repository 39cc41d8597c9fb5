"""CPU engines: `kvm` (the KVM API through cffi) and `emu` (Unicorn), behind one interface
(`replayvm.engines.base.Engine`); `registry.engine_class(name)` names their classes."""
