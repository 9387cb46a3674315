"""An ALICE-style crash-state explorer ("All File Systems Are Not Created Equal",
OSDI '14) for power loss.

A workload of lamina commands runs under strace (:mod:`.trace`); the calls are
replayed on a model of the root (:mod:`.record`, :mod:`.tree`); the persistence
model (:mod:`.states`) says which subsets of them a power cut may leave on the
disk; each such state is written out as a root (:mod:`.materialise`), opened
by lamina as after a restart and checked (:mod:`.explorer`).
"""
