//! Notion's own async protocol, made invisible: [`adapter`] turns `allow_async` → `async_task` →
//! `notion-get-async-task` into a standard MCP task; [`forms`] reads every form Notion answers in (the
//! seed's envelope, the published `async_task` object, poll answers, Notion's errors); [`poll`] keeps
//! every request to one Notion upstream within one shared budget (3 requests/s), with per-task backoff
//! and retry-after pauses.

pub mod adapter;
pub mod forms;
pub mod poll;
