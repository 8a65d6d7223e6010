"""Everything mtp-migrate knows about the inline MTP cross-entropy loop lives here.

``find`` locates head loops and, through ``evaluate`` (the loop body, symbolically) and
``classify`` (which tensor is the mask, which the weights, which options), describes each
as a ``Site`` with a ``LoopSpec`` or a refusal; ``plan`` makes the one decision per site
that every command follows; ``emit`` writes the call or the `del`.
"""
