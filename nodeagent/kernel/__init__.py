"""The node's kernel networking: make the links, FDB/neighbour entries and job network namespaces of ONE
node's network namespace match `DesiredState`.

    reconciler.py  public API (NetSettings, NetworkReconciler): observe -> plan -> apply, with a model
    observe.py     read the kernel into `model.Observed`
    plan.py        PURE: (desired, observed) -> ordered list of `steps.Step`
    apply.py       execute one step, idempotently
    netlink.py     typed facade over pyroute2 (the only module that imports it)
    namespaces.py  unshare/setns/bind-mount helpers for job network namespaces (ctypes)
    errors.py      errno -> typed exceptions naming the object and the namespace

`plan`, `steps` and `model` import neither pyroute2 nor anything that touches the kernel.
"""
