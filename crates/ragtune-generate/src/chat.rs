//! Chat templates: the model's Jinja `tokenizer.chat_template`, rendered with minijinja the way
//! Hugging Face `transformers` and llama-cpp-python render it with jinja2.
//!
//! Compatibility: `trim_blocks` and `lstrip_blocks` on (as both do), the variables `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`, the function `raise_exception(msg)`,
//! loop controls, `tojson`, and Python string/dict methods (`.strip()`, `.startswith()`,
//! `.items()`, ...) through `minijinja-contrib`'s pycompat layer.

use serde::Serialize;

use crate::{Error, LlamaProps, Result, Tokenizer};

/// The speaker of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The person asking.
    User,
    /// The model.
    Assistant,
    /// A tool's output.
    Tool,
}

/// One chat message, as the template sees it (`message['role']`, `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template with the model's BOS and EOS token strings.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Context<'a> {
    messages: &'a [ChatMessage],
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the token *strings* the template
    /// may print (`"<|im_start|>"`, `"<|im_end|>"`), empty if the model has none.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] with the line of a syntax error.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.into())
            .map_err(|source| Error::ChatTemplate { source })?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Renders the prompt for `messages`; with `add_generation_prompt` the template appends
    /// the assistant's turn header so the model answers next.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] if rendering fails, including the template raising an
    /// exception (e.g. roles that do not alternate).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|source| Error::ChatTemplate { source })?;
        let ctx = Context {
            messages,
            add_generation_prompt,
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
        };
        tmpl.render(ctx)
            .map_err(|source| Error::ChatTemplate { source })
    }

    /// The model's own template (`tokenizer.chat_template`), with its BOS/EOS token strings;
    /// for a Gemma 3 file without one (the pretrained checkpoints), Gemma 3's documented turn
    /// format ([`GEMMA3_TEMPLATE`]); `None` if the file has no template otherwise.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] if the template does not compile.
    pub fn from_props(props: &LlamaProps, tokenizer: &Tokenizer) -> Result<Option<Self>> {
        let fallback = (props.architecture == crate::Architecture::Gemma3)
            .then(|| GEMMA3_TEMPLATE.to_string());
        let Some(source) = props.chat_template.clone().or(fallback) else {
            return Ok(None);
        };
        let source = &source;
        let text = |id: Option<u32>| {
            id.and_then(|id| tokenizer.id_to_token(id))
                .unwrap_or_default()
        };
        Self::new(
            source.clone(),
            text(props.special.bos),
            text(props.special.eos),
        )
        .map(Some)
    }

    /// The BOS token string given to the template.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS token string given to the template.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// Gemma 3's turn format (`<start_of_turn>user … <end_of_turn>`, the model's turns as
/// `model`, a system message folded into the first user turn), as in the instruction-tuned
/// checkpoints' own template, without its leading `{{ bos_token }}`: the tokenizer prepends
/// BOS itself (`tokenizer.ggml.add_bos_token`). `benches/anchors/gemma3_golden.py` renders
/// llama.cpp's reference prompts with the same text.
pub const GEMMA3_TEMPLATE: &str = concat!(
    "{%- if messages[0]['role'] == 'system' -%}",
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}",
    "{%- set loop_messages = messages[1:] -%}",
    "{%- else -%}",
    "{%- set first_user_prefix = '' -%}",
    "{%- set loop_messages = messages -%}",
    "{%- endif -%}",
    "{%- for message in loop_messages -%}",
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}",
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}",
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}",
    "{{ message['content'] | trim }}",
    "{{ '<end_of_turn>\n' }}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}",
);

/// `raise_exception(message)`: fails the render with the template's message.
fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        message,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").expect("compile");
        let out = t
            .render(
                &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
                true,
            )
            .expect("render");
        assert_eq!(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let out = t.render(&[ChatMessage::user("Hi")], false).expect("render");
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn bos_eos_and_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip() }}{% if m.role.startswith('ass') %}{{ eos_token }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").expect("compile");
        let out = t
            .render(
                &[ChatMessage::user("  q  "), ChatMessage::assistant(" a ")],
                false,
            )
            .expect("render");
        assert_eq!(out, "<s>qa</s>");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_jinja2_in_transformers() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").expect("compile");
        assert_eq!(
            t.render(&[ChatMessage::user("x")], false).expect("render"),
            "[x]\n"
        );
    }

    #[test]
    fn hf_template_idioms() {
        // namespace, length, trim, tojson, loop.last, items(): as Llama 3 / Mistral templates use.
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ m.content|trim }}{% if not loop.last %}|{% endif %}{% endfor %};{{ ns.n }}/{{ messages|length }};{{ messages[0]|tojson }};{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").expect("compile");
        let out = t
            .render(&[ChatMessage::system(" s "), ChatMessage::user("u")], false)
            .expect("render");
        assert_eq!(out, r#"s|u;2/2;{"role":"system","content":" s "};a=1"#);
    }

    #[test]
    fn raise_exception_is_an_error_with_the_message() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}";
        let t = ChatTemplate::new(src, "", "").expect("compile");
        let err = t
            .render(&[ChatMessage::assistant("x")], false)
            .expect_err("raises");
        assert!(
            err.to_string()
                .contains("Conversation must start with user"),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_is_typed() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(Error::ChatTemplate { .. })
        ));
    }
}
