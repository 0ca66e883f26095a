"""`stepdistill push`: a run's LoRA (diffusers and kohya files), recipe, model card and sample grid to the Hub.

One commit with an explicit file list (nothing else in the folder travels). The card is rendered again with the
repo id in its usage snippet, so it loads from the Hub as written.
"""

from __future__ import annotations

import os
from pathlib import Path

from .card import CARD_FILE, GRID_FILE, render_model_card
from .core.lora_layout import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from .core.recipe import RECIPE_FILE
from .errors import HubError, ModelError

REQUIRED = (DIFFUSERS_WEIGHT_NAME, RECIPE_FILE)
OPTIONAL = (KOHYA_WEIGHT_NAME, GRID_FILE)


def export_folder(run) -> tuple[Path, Path | None]:
    """(folder to push, its run folder): RUN/final of a training run, or an export folder itself."""
    run = Path(run)
    if (run / "final" / RECIPE_FILE).is_file():
        return run / "final", run
    if (run / RECIPE_FILE).is_file():
        parent = run.parent if (run.parent / "resolved_config.yaml").is_file() else None
        return run, parent
    raise ModelError(f"no {RECIPE_FILE} in {run} or {run / 'final'}: pass --run the training run folder "
                     "(or an export folder)")


def files_to_push(folder: Path) -> list[str]:
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"{folder} has no {', '.join(missing)}: push a folder that training or `stepdistill export "
                         "--format diffusers` wrote")
    return [*REQUIRED, *(name for name in OPTIONAL if (folder / name).is_file())]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_token() -> str:
    """The Hub token, or a HubError saying how to provide one; checked before anything is uploaded."""
    if _offline():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset HF_HUB_OFFLINE on a machine with "
                       "network access and run stepdistill push again")
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("stepdistill push needs huggingface_hub: pip install huggingface_hub") from None
    token = huggingface_hub.get_token()
    if not token:
        raise HubError("no Hugging Face token: run `hf auth login` (or set HF_TOKEN to a token with write access)")
    return token


def push_run(run, repo_id: str, private: bool = False) -> tuple[str, list[str]]:
    """Create (or reuse) the model repo and upload the export in one commit; returns (repo URL, files pushed)."""
    folder, run_dir = export_folder(run)
    names = files_to_push(folder)
    card = render_model_card(folder, run_dir, repo_id=repo_id)
    token = hub_token()
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    # huggingface_hub >= 1.0 speaks httpx, whose transport errors are not OSErrors; older releases raise requests'.
    transport_error = getattr(huggingface_hub.errors, "HTTPError", OSError)
    api = huggingface_hub.HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8")))
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=f"stepdistill: {folder.name} LoRA, recipe and card",
                          repo_type="model")
    except HFValidationError as e:
        raise HubError(f"--repo-id {repo_id!r} is not a valid repo id ({e}): write USER/NAME") from e
    except HfHubHTTPError as e:
        raise HubError(f"the Hub refused the push to {repo_id} ({e}): check that the token can write there") from e
    except (OSError, transport_error) as e:
        raise HubError(f"could not reach the Hub to push {repo_id} ({type(e).__name__}: {e}): check the network") from e
    return str(url), [*names, CARD_FILE]
