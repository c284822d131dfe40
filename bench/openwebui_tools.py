"""Tool definitions shaped like the ~36 built-in tools Open WebUI sends with every chat message
in native function-calling mode (about 25 KB of JSON, about 7k tokens for Qwen's tokenizer).

Names and parameters follow Open WebUI's built-ins (web search, knowledge bases, notes, chats,
memories, time, images, code, channels); the descriptions are written for the bench, at the
length Open WebUI's are, since what the bench measures is their size. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

# (name, what it does, [(parameter, JSON type, what it means)])
BUILTIN: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    ("search_web", "Search the public web and return the top results with titles, links and "
     "snippets.", [("query", "string", "the search terms"),
                   ("count", "integer", "how many results to return, 1 to 10")]),
    ("fetch_url", "Fetch a web page and return its readable text, without scripts or styling.",
     [("url", "string", "the absolute http or https address to fetch")]),
    ("query_knowledge_bases", "Search every knowledge base the user can read for passages "
     "relevant to a question.", [("query", "string", "the question, in natural language"),
                                 ("limit", "integer", "the most passages to return")]),
    ("search_knowledge_bases", "List knowledge bases whose name or description matches.",
     [("query", "string", "words to match against names and descriptions")]),
    ("view_knowledge_base", "Show a knowledge base: its description and the files in it.",
     [("knowledge_id", "string", "the knowledge base's id")]),
    ("query_knowledge_files", "Search the files attached to this chat for relevant passages.",
     [("query", "string", "the question"), ("file_ids", "array", "restrict to these files")]),
    ("view_knowledge_file", "Return the full text of one file from a knowledge base.",
     [("file_id", "string", "the file's id"), ("offset", "integer", "first character"),
      ("length", "integer", "how many characters to return")]),
    ("search_notes", "Search the user's notes by title and content.",
     [("query", "string", "words to look for"), ("limit", "integer", "the most notes")]),
    ("view_note", "Return one note's title and content in Markdown.",
     [("note_id", "string", "the note's id")]),
    ("write_note", "Create a note with a title and Markdown content.",
     [("title", "string", "the note's title"), ("content", "string", "Markdown content")]),
    ("replace_note_content", "Replace a note's content, keeping its title and history.",
     [("note_id", "string", "the note's id"), ("content", "string", "the new Markdown")]),
    ("append_to_note", "Add Markdown at the end of an existing note.",
     [("note_id", "string", "the note's id"), ("content", "string", "Markdown to append")]),
    ("search_chats", "Search the user's earlier chats by title and message text.",
     [("query", "string", "words to look for"), ("limit", "integer", "the most chats")]),
    ("view_chat", "Return the messages of an earlier chat, oldest first.",
     [("chat_id", "string", "the chat's id"), ("limit", "integer", "the most messages")]),
    ("search_memories", "Search what the assistant remembers about the user.",
     [("query", "string", "what to recall")]),
    ("add_memory", "Remember a fact about the user for later chats.",
     [("content", "string", "the fact, as one sentence")]),
    ("replace_memory_content", "Correct a remembered fact.",
     [("memory_id", "string", "the memory's id"), ("content", "string", "the corrected fact")]),
    ("delete_memory", "Forget a remembered fact.", [("memory_id", "string", "the memory's id")]),
    ("list_memories", "List everything remembered about the user, newest first.",
     [("limit", "integer", "the most memories to list")]),
    ("get_current_timestamp", "Return the current date and time in the user's time zone.", []),
    ("calculate_timestamp", "Add or subtract a duration from a date and return the result.",
     [("start", "string", "an ISO 8601 date or date-time"),
      ("days", "integer", "days to add (negative to subtract)"),
      ("hours", "integer", "hours to add (negative to subtract)")]),
    ("convert_time_zone", "Convert a date-time from one IANA time zone to another.",
     [("timestamp", "string", "an ISO 8601 date-time"), ("from_zone", "string", "source zone"),
      ("to_zone", "string", "target zone")]),
    ("generate_image", "Create an image from a text description with the configured engine.",
     [("prompt", "string", "what the image shows"), ("size", "string", "e.g. 1024x1024"),
      ("negative_prompt", "string", "what it must not show")]),
    ("edit_image", "Change an image attached to this chat as described.",
     [("file_id", "string", "the image's file id"), ("prompt", "string", "the change")]),
    ("execute_code", "Run Python in a sandbox and return its output, errors and files.",
     [("code", "string", "the Python source"),
      ("timeout", "integer", "seconds before it is stopped")]),
    ("list_channels", "List the channels the user belongs to.", []),
    ("search_channel_messages", "Search messages in the user's channels.",
     [("query", "string", "words to look for"), ("channel_id", "string", "one channel only")]),
    ("view_channel_message", "Return one channel message with its reactions.",
     [("message_id", "string", "the message's id")]),
    ("view_channel_thread", "Return the replies in a channel message's thread.",
     [("message_id", "string", "the thread's first message")]),
    ("post_channel_message", "Post a message to a channel as the user.",
     [("channel_id", "string", "the channel's id"), ("content", "string", "Markdown text")]),
    ("list_models", "List the models available to the user with their capabilities.", []),
    ("list_tools", "List the tools and functions installed on this server.", []),
    ("list_prompts", "List the user's saved prompts and their commands.", []),
    ("view_prompt", "Return a saved prompt's text.", [("command", "string", "its command")]),
    ("get_user_settings", "Return the user's interface and chat settings.", []),
    ("get_weather", "Return the current weather and today's forecast for a place.",
     [("location", "string", "a city, optionally with its country"),
      ("units", "string", "metric or imperial")]),
]  # fmt: skip

# Open WebUI's built-in descriptions run to a few sentences: this is said after each one so
# that the bench sends about as many bytes.
USAGE = (
    " Use it only when the user's request needs it; do not call it to answer questions you can "
    "answer from the conversation. Results are returned as JSON and may be long: summarise them "
    "for the user instead of repeating them. If it fails, say so and do not retry more than once. "
    "Ask the user before doing anything that cannot be undone, and say which tool you used."
)


def tool(name: str, description: str, parameters: list[tuple[str, str, str]]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for parameter, kind, meaning in parameters:
        schema: dict[str, Any] = {"type": kind, "description": meaning[:1].upper() + meaning[1:]}
        if kind == "array":
            schema["items"] = {"type": "string"}
        properties[parameter] = schema
    required = [p for p, kind, _ in parameters if kind == "string"][:1]
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description + USAGE,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def openwebui_tools(count: int = len(BUILTIN)) -> list[dict[str, Any]]:
    """The first `count` (at most 36) built-in tools, in Open WebUI's request shape."""
    return [tool(*entry) for entry in BUILTIN[: max(0, min(count, len(BUILTIN)))]]
