"""What lm-eval's `ifeval` task needs offline: NLTK's punkt_tab sentence model.

IFEval counts sentences with NLTK's punkt_tab model, which lm-eval's task downloads when it is
imported and NLTK cannot find it: with no network, the download fails and the first response
that has a sentence-count instruction crashes the run. The same data ships in the
`llama-index-core` wheel, which the Makefile installs without its dependencies as a carrier
only (never imported); its folder joins NLTK's search path. The task's other needs,
`langdetect` and `immutabledict`, are pinned in pyproject.toml.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

# Where llama-index-core keeps NLTK's data (tokenizers/punkt_tab, corpora/stopwords).
CARRIER, FOLDER = "llama-index-core", "llama_index/core/_static/nltk_cache"


def use_packaged_punkt() -> str | None:
    """Add the carrier's NLTK data to NLTK's search path where punkt_tab is not found already;
    the folder NLTK finds punkt_tab in, or None when neither has it."""
    import nltk

    try:
        return str(nltk.data.find("tokenizers/punkt_tab"))
    except LookupError:
        pass
    try:
        folder = distribution(CARRIER).locate_file(FOLDER)
    except PackageNotFoundError:
        return None
    if not (folder / "tokenizers" / "punkt_tab").is_dir():
        return None
    nltk.data.path.append(str(folder))
    return str(nltk.data.find("tokenizers/punkt_tab"))
