"""Numerical verification of rewritten sites (DESIGN §6)."""

from codemods.verify.harness import SiteProgram, program, verify_programs

__all__ = ["SiteProgram", "program", "verify_programs"]
