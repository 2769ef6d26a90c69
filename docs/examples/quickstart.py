# MaskNetClassifier on a polars DataFrame: fit, score, cross-validate, save, reload (docs/api.md).
# Small settings (2 epochs, blocks 64 wide, 1 thread) keep it to about a minute on 2 cores;
# drop `epochs` and `config` for the paper's model. Run from the repository root.
import os

import polars as pl
from sklearn.model_selection import cross_val_score

import masknet
from masknet.data.formats import CRITEO_COLUMNS  # label, I1..I13 (numbers), C1..C26 (hashed strings)

DATA = os.environ.get("MASKNET_DATA", "../shared/data") + "/criteo-8k"
text = {f"C{i}": pl.String for i in range(1, 27)}  # hex ids stay strings even when they look numeric
train, test = (pl.read_csv(f"{DATA}/{f}.txt", separator="\t", has_header=False, new_columns=CRITEO_COLUMNS,
                           schema_overrides=text) for f in ("train", "test"))
X, y = train.drop("label"), train["label"]

clf = masknet.MaskNetClassifier(epochs=2, config={"model.block_dim": 64, "train.threads": 1})
clf.fit(X, y)  # I columns are inferred numeric, C columns categorical; 10% held out for early stopping
print(f"test AUC {clf.score(test.drop('label'), test['label']):.4f}")
print("3-fold AUC", cross_val_score(clf, X, y, cv=3).round(4))
clf.save("runs/quickstart-clf", overwrite=True)  # a normal bundle: masknet predict/serve --model reads it
again = masknet.load("runs/quickstart-clf")
print("reloaded gives the same scores:", bool((again.predict_proba(test) == clf.predict_proba(test)).all()))
