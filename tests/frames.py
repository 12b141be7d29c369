"""Write a DataFrame as CSV, Parquet or JSON Lines, chosen by the file's extension."""

from pathlib import Path

import pandas as pd


def write_frame(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path
