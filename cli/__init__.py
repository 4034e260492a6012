"""The flashrt command line (click)."""
