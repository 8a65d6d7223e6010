"""Nothing the tool writes or runs can leave the repository broken: write order, symlinks, signals,
renames, odd file names and syntax the analysis must walk (issue 20)."""

from pathlib import Path

from mtp_migrate.runner import default_verifier, migrate_source

ROOT = Path(__file__).parents[1]
BEFORE = ROOT / "fixtures" / "pipelines" / "before"


def test_a_match_statement_around_or_beside_a_site_is_walked():
    text = (BEFORE / "run_baseline.py").read_text()
    start, stop = text.index("    ce_loss = torch.tensor(0.0"), text.index("    optimizer.zero_grad()")
    site = "".join(f"        {line}" if line.strip() else line for line in text[start:stop].splitlines(keepends=True))
    text = text[:start] + '    match batch.get("mode"):\n        case "skip":\n            return {}\n' \
                          "        case _:\n" + site + text[stop:]
    result = migrate_source(text.encode(), "run_match.py", verifier=default_verifier())
    assert [(site.action.value, site.verified) for site in result.sites] == [("rewritten", True)] * 2
    assert "        case _:\n            ce_loss = compute_mtp_ce_loss_unweighted(" in result.output.decode()
