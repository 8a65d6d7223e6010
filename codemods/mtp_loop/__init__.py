"""Everything mtp-migrate knows about the inline MTP cross-entropy loop lives here.

``recognize`` turns a site (accumulator inits, the head loop, the head average) into a
``LoopSpec`` or a ``Refusal`` with a reason; ``emit`` turns a spec into code.
"""

from codemods.mtp_loop.recognize import SiteFinder, find_sites
from codemods.mtp_loop.spec import LoopSpec, Refusal, Site

__all__ = ["LoopSpec", "Refusal", "Site", "SiteFinder", "find_sites"]
