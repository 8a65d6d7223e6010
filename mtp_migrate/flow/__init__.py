"""Names in the flow of a function: what statements read, bind and may change, which
definition reaches a point, what is live after it. Neutral ground: the recognizer
(``mtp_loop``) and the verifier (``verify``) both build on it, and neither owns it."""
