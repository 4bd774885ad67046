"""Training engines behind one interface, so the loop does not know which one runs:

    forward_backward(input_ids) -> loss      one micro-batch (loss before scaling)
    step()                                   after every micro-batch; updates at the boundary
    grad_norm -> float | None                of the last update
    lr -> float
    save(root, tag) / load(root, tag)        every rank, into root/tag
"""
