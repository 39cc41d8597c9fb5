"""The PC's devices: each a small state machine with read(offset, size) / write(offset, size, value).

Devices never read host time or host input directly: time comes from the machine's GuestClock and
input through an explicit `feed_*` method, so every nondeterministic input enters through one door
the recorder can log and the replayer can feed.
"""
