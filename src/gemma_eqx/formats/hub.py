"""Models from the network: Kaggle (`kagglehub`) and the Hugging Face Hub (`huggingface_hub`,
whose cache is used offline). Every failure is one `ModelUnavailableError` sentence that says
what to do; readers of what was downloaded live in `kaggle` and `hf`."""

from __future__ import annotations

from pathlib import Path

# Pre-trained Flax checkpoints on Kaggle, one per preset.
KAGGLE_HANDLES: dict[str, str] = {
    "gemma-2b": "google/gemma/flax/2b",
    "gemma-7b": "google/gemma/flax/7b",
    "gemma2-2b": "google/gemma-2/flax/gemma2-2b",
    "gemma2-9b": "google/gemma-2/flax/gemma2-9b",
    "gemma2-27b": "google/gemma-2/flax/gemma2-27b",
    "gemma3-270m": "google/gemma-3/flax/gemma3-270m",
    "gemma3-1b": "google/gemma-3/flax/gemma3-1b",
    "gemma3-4b": "google/gemma-3/flax/gemma3-4b",
    "gemma3-12b": "google/gemma-3/flax/gemma3-12b",
    "gemma3-27b": "google/gemma-3/flax/gemma3-27b",
}


class ModelUnavailableError(RuntimeError):
    """The model cannot be had here; the message says what to do."""


def looks_like_kaggle_handle(text: str) -> bool:
    parts = text.split("/")
    return len(parts) in (4, 5) and all(parts) and parts[2].lower() == "flax"


def kaggle_download(handle: str) -> Path:
    """Download a Kaggle model with kagglehub; failures become one clear sentence."""
    import kagglehub
    import requests
    from kagglehub import exceptions as kx

    try:
        return Path(kagglehub.model_download(handle))
    except requests.exceptions.ConnectionError:
        raise ModelUnavailableError(
            f"cannot reach Kaggle to download {handle} (no network connection); download it on "
            f"a connected machine with kagglehub.model_download({handle!r}) and pass its "
            f"directory to from_pretrained"
        ) from None
    except (kx.UnauthenticatedError, kx.CredentialError, kx.KaggleApiHTTPError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 404:
            raise ModelUnavailableError(f"Kaggle has no model {handle}") from None
        from kagglehub.config import get_kaggle_credentials

        if get_kaggle_credentials() is None:
            raise ModelUnavailableError(
                f"Kaggle credentials are missing for {handle}: set KAGGLE_USERNAME and "
                f"KAGGLE_KEY or write ~/.kaggle/kaggle.json, and accept the Gemma licence on "
                f"kaggle.com"
            ) from None
        raise ModelUnavailableError(
            f"Kaggle refused {handle} ({e.__class__.__name__}): accept the Gemma licence for "
            f"this model on kaggle.com with the account of your credentials"
        ) from None


# ------------------------------------------------------------------------ the Hugging Face Hub


def looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


HF_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def hf_download(repo_id: str, *, revision: str | None = None,
                allow_patterns: list[str] | None = None) -> Path:
    """The repo's snapshot in the Hugging Face cache, downloaded if needed (token from
    `HF_TOKEN` or `hf auth login`); failures become one sentence that says what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision,
            allow_patterns=HF_FILES if allow_patterns is None else allow_patterns))
    except errors.GatedRepoError:
        raise ModelUnavailableError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} with "
            f"the account whose token this machine uses (HF_TOKEN or `hf auth login`)"
        ) from None
    except errors.RepositoryNotFoundError:
        token = huggingface_hub.get_token()
        raise ModelUnavailableError(
            f"the Hugging Face Hub has no repo {repo_id}"
            + ("" if token else ", or it is private and no token is set (HF_TOKEN or "
               "`hf auth login`)")
        ) from None
    except errors.LocalEntryNotFoundError:
        raise ModelUnavailableError(
            f"cannot reach the Hugging Face Hub to download {repo_id}, and it is not in the "
            f"local cache ({huggingface_hub.constants.HF_HUB_CACHE}): connect, or run "
            f"`hf download {repo_id}` on a connected machine and pass the directory"
        ) from None
    except errors.HfHubHTTPError as e:
        raise ModelUnavailableError(f"the Hugging Face Hub refused {repo_id}: {e}") from None
