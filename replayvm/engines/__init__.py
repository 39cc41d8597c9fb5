"""CPU engines: `kvm` (the KVM API through cffi) and `emu` (Unicorn), behind one interface."""
