"""Worker processes: the data path spread over several processes, the engine's state kept by one.

With AUTOSLEEPD_WORKERS=N the owner process (the supervisor, the control loop, the admin
endpoints and metrics, and a data path of its own) starts N-1 workers that accept on the same
listening socket (inherited) and relay requests with the same lean ``Relay``, a worker gate in
the supervisor's place. A worker admits work without asking the owner while the shared admission
flag is open (``shared.py``), and asks the owner only on the slow path: a request that finds admission closed is held in the owner's own
queue (one wake, one queue bound, one set of hold timeouts for every process), and its answer
(admitted, or refused with a reason) comes back over the worker's link (``gate.py``, ``owner.py``).
On a host of several engines each engine has its own segment, and a worker a gate per engine.
"""
