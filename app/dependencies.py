"""Shared objects for route handlers, through ``Depends``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .auth import TenantDep
from .batching import MicroBatcher
from .limits import CharBudget
from .queue import AdaptationQueue
from .service import ModelService
from .settings import Settings
from .storage import DomainStore


def request_settings(request: Request) -> Settings:
    """The settings the app was created with (``app.state``), for ``Depends``."""
    return request.app.state.settings


def get_service(request: Request) -> ModelService:
    return request.app.state.service


def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


def get_store(request: Request) -> DomainStore:
    return request.app.state.store


def get_char_budget(request: Request) -> CharBudget:
    return request.app.state.char_budget


def get_adapt_queue(request: Request) -> AdaptationQueue:
    return request.app.state.adapt_queue


SettingsDep = Annotated[Settings, Depends(request_settings)]
ServiceDep = Annotated[ModelService, Depends(get_service)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
StoreDep = Annotated[DomainStore, Depends(get_store)]
AdaptQueueDep = Annotated[AdaptationQueue, Depends(get_adapt_queue)]
CharBudgetDep = Annotated[CharBudget, Depends(get_char_budget)]

__all__ = ["AdaptQueueDep", "BatcherDep", "CharBudgetDep", "ServiceDep", "SettingsDep", "StoreDep", "TenantDep"]
