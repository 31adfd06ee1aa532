"""The listening room: a local web page (`mehldau-app`) to sample every branch, hear it, and
judge it blind. Gradio is an optional extra (`pip install -e ".[app]"`); nothing else in
mehldau imports this package."""
