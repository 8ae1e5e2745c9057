"""The PyTorch chunk path (DESIGN §3), one file per stage; `dplr.engine` runs them in order."""
