"""Find WordNet 3.0 on this machine, offline, for METEOR's synonym stage.

Looked for, in order: an explicit folder; ``$MED3DVLM_WORDNET``; WordNet's own ``$WNSEARCHDIR``
and ``$WNHOME/dict``; nltk data the user has (``$NLTK_DATA``, ``~/nltk_data``...: corpora/wordnet,
zipped or not); the Debian/Ubuntu packages ``wordnet-base`` / ``wordnet`` (/usr/share/wordnet) and
other usual system folders. Nothing is downloaded.

Debian's folder lacks the small ``lexnames`` table that nltk's reader insists on, so such a folder
is copied once (28 MB) to a cache folder with that table written beside it: nltk >= 3.9 refuses
links (hard or symbolic) and reads only below its data path, to which the folder read is added.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

MISSING = ("WordNet 3.0 was not found offline, so METEOR runs without its synonym stage; install it with "
           "'apt-get install wordnet-base' (or put nltk's wordnet corpus under $NLTK_DATA) or pass its folder.")
SYSTEM_FOLDERS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/WordNet-3.0/dict",
                  "/usr/local/WordNet-3.0/dict", "/opt/homebrew/share/wordnet")
DATA_FILES = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv"))
OPTIONAL_FILES = ("adj.exc", "adv.exc", "noun.exc", "verb.exc", "cntlist.rev", "index.sense")
# The lexicographer files of WordNet 3.0, by number (lexnames(5WN)); data.* lines index into it.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


@dataclass(frozen=True)
class WordNetSource:
    reader: object          # an nltk WordNetCorpusReader
    where: str              # the folder or nltk resource it was read from


def _is_dict_folder(folder: Path) -> bool:
    return all((folder / name).is_file() for name in DATA_FILES)


def _env_folders() -> list[Path]:
    env = os.environ
    found = [env.get("MED3DVLM_WORDNET"), env.get("WNSEARCHDIR"),
             Path(env["WNHOME"]) / "dict" if env.get("WNHOME") else None]
    return [Path(p).expanduser() for p in found if p]


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "med3dvlm" / "wordnet"


def _staged(folder: Path) -> Path:
    """``folder`` itself if nltk can read it as it is, else a cached copy with ``lexnames`` added."""
    if (folder / "lexnames").is_file():
        return folder
    target = _cache_root() / str(folder.resolve()).strip("/").replace("/", "_")
    target.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES + OPTIONAL_FILES:
        source, copy = folder / name, target / name
        if source.is_file() and not (copy.is_file() and copy.stat().st_size == source.stat().st_size):
            shutil.copyfile(source, copy)
    category = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}  # lexnames' third column
    (target / "lexnames").write_text("".join(f"{i:02d}\t{name}\t{category[name.split('.')[0]]}\n"
                                             for i, name in enumerate(LEXNAMES)))
    return target


def _reader(folder: Path):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None  # a mapping to nltk's own copy, for multilingual data only; it needs that copy

    if str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))  # nltk >= 3.9 reads only below its data path
    with warnings.catch_warnings():  # "multilingual functions are not available": not needed here
        warnings.simplefilter("ignore")
        return Reader(str(folder), None)


def _from_nltk_data():
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        try:
            nltk.data.find("corpora/wordnet.zip")
        except LookupError:
            return None
    from nltk.corpus import wordnet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wordnet.ensure_loaded()
    return wordnet


def find_wordnet(explicit: str | os.PathLike | None = None) -> WordNetSource | None:
    """A WordNet reader from the first place that has the dictionary files, or None."""
    if explicit is not None:
        folder = Path(explicit).expanduser()
        if not _is_dict_folder(folder):
            raise FileNotFoundError(f"{folder} is not a WordNet dict folder (it lacks one of {', '.join(DATA_FILES)}).")
        return WordNetSource(_reader(_staged(folder)), str(folder))
    for folder in _env_folders():
        if _is_dict_folder(folder):
            return WordNetSource(_reader(_staged(folder)), str(folder))
    wordnet = _from_nltk_data()
    if wordnet is not None:
        return WordNetSource(wordnet, "nltk data (corpora/wordnet)")
    for folder in map(Path, SYSTEM_FOLDERS):
        if _is_dict_folder(folder):
            return WordNetSource(_reader(_staged(folder)), str(folder))
    return None
