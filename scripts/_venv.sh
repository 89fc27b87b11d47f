# Sourced by demo.sh and test.sh: one virtual environment, one install recipe.
# pip (not uv): on the reference machines pip resolves torch/torchvision from local wheels; uv would
# download a multi-GB CUDA build.
install_project() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install --quiet -e "$1"
}
