//! Task events, in the order they happened, through one forwarder.
//!
//! The model queues an event while it holds its state lock, at the moment the state
//! changes, on an unbounded channel (queueing never waits); one task forwards the queue to
//! containerd. So TaskExit can never overtake the TaskStart of the same process, and no
//! RPC ever waits on containerd's event service.

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;
use tokio::sync::mpsc;

/// One task event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Create(TaskCreate),
    Start(TaskStart),
    ExecAdded(TaskExecAdded),
    ExecStarted(TaskExecStarted),
    Exit(TaskExit),
    Delete(TaskDelete),
    Oom(TaskOOM),
}

impl Event {
    pub fn topic(&self) -> &'static str {
        match self {
            Event::Create(_) => topics::TASK_CREATE_EVENT_TOPIC,
            Event::Start(_) => topics::TASK_START_EVENT_TOPIC,
            Event::ExecAdded(_) => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Event::ExecStarted(_) => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Event::Exit(_) => topics::TASK_EXIT_EVENT_TOPIC,
            Event::Delete(_) => topics::TASK_DELETE_EVENT_TOPIC,
            Event::Oom(_) => topics::TASK_OOM_EVENT_TOPIC,
        }
    }

    fn into_message(self) -> Box<dyn MessageDyn> {
        match self {
            Event::Create(e) => Box::new(e),
            Event::Start(e) => Box::new(e),
            Event::ExecAdded(e) => Box::new(e),
            Event::ExecStarted(e) => Box::new(e),
            Event::Exit(e) => Box::new(e),
            Event::Delete(e) => Box::new(e),
            Event::Oom(e) => Box::new(e),
        }
    }
}

pub type EventTx = mpsc::UnboundedSender<Event>;
pub type EventRx = mpsc::UnboundedReceiver<Event>;

pub fn channel() -> (EventTx, EventRx) {
    mpsc::unbounded_channel()
}

/// Forwards events to containerd in order until every sender is gone.
pub async fn forward(mut rx: EventRx, publisher: RemotePublisher, namespace: String) {
    while let Some(event) = rx.recv().await {
        let topic = event.topic();
        if let Err(e) = publisher
            .publish(Context::default(), topic, &namespace, event.into_message())
            .await
        {
            log::error!("cannot publish {topic}: {e}");
        }
    }
}
