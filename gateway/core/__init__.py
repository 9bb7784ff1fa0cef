"""The bottom floor: what every layer above shares and nothing of the project below it.

    context   the request as it travels (RequestContext, Chunk, Usage, Decision, Reservation)
    errors    the error tree and its OpenAI body
    backend   the Backend protocol, Capacity, MemorySnapshot, BackendStats
    policy    the Policy and Fallback protocols, Outcome
    config    what policies and the gateway both read of the config: tenants, models
    kv        the torch-free KV and adapter byte arithmetic
    media     media types (JSON or not)
    procmem   process and GPU memory as the OS and the driver report it

Nothing here imports gateway/ outside core, policies/ or backends/ (tests/test_layers.py).
"""
