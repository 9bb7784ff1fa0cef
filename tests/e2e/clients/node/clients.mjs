// The openai Node SDK and the Vercel AI SDK against a gateway: `node clients.mjs URL CHECK`
// runs one check and prints its typed result as JSON; a failed check throws (exit code 1).
import OpenAI from "openai";
import { zodFunction, zodResponseFormat } from "openai/helpers/zod";
import { createOpenAI } from "@ai-sdk/openai";
import { generateObject, generateText, streamObject, tool } from "ai";
import { z } from "zod";

const [url, check] = process.argv.slice(2);
const apiKey = "sk-demo-acme";
const ask = "What is the weather like in Paris today?";
const Weather = z.object({ city: z.string(), celsius: z.number().int() });
// a recursive type: zod writes it with a $ref back into the schema
const Folder = z.lazy(() => z.object({ name: z.string(), children: z.array(Folder) }));
const settings = { temperature: 0, seed: 1 };

function expect(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
}

const checks = {
  // openai SDK: .parse() with zodResponseFormat; the parsed value is the zod type
  async zodResponseFormat() {
    const client = new OpenAI({ baseURL: url, apiKey, maxRetries: 0 });
    const done = await client.chat.completions.parse({
      model: "demo", messages: [{ role: "user", content: ask }], max_tokens: 60,
      response_format: zodResponseFormat(Weather, "weather"), ...settings });
    const parsed = done.choices[0].message.parsed;
    expect(Weather.safeParse(parsed).success, "parsed is a Weather");
    return parsed;
  },
  // openai SDK: zodFunction with a recursive parameter type, a named call, parsed arguments
  // (the demo model writes nested arguments poorly: this pins a request it completes)
  async zodFunction() {
    const client = new OpenAI({ baseURL: url, apiKey, maxRetries: 0 });
    const save = zodFunction({ name: "save_folder", parameters: z.object({ root: Folder }) });
    expect(JSON.stringify(save.function.parameters).includes("$ref"), "the schema recurses by $ref");
    const done = await client.chat.completions.parse({
      model: "demo", messages: [{ role: "user", content: "Save a folder named docs." }],
      tools: [save], tool_choice: { type: "function", function: { name: "save_folder" } },
      max_tokens: 120, temperature: 1, seed: 6 });
    const call = done.choices[0].message.tool_calls[0];
    expect(done.choices[0].finish_reason === "tool_calls", "the call is complete");
    expect(call.function.name === "save_folder", "the named tool is called");
    expect(z.object({ root: Folder }).safeParse(call.function.parsed_arguments).success,
      "the arguments are a folder tree");
    return call.function.parsed_arguments;
  },
  // AI SDK: generateObject over chat completions
  async generateObject() {
    const model = createOpenAI({ baseURL: url, apiKey }).chat("demo");
    const { object, finishReason } = await generateObject({
      model, schema: Weather, prompt: ask, maxOutputTokens: 60, maxRetries: 0, ...settings });
    expect(finishReason === "stop" && Weather.safeParse(object).success, "object is a Weather");
    return object;
  },
  // AI SDK: streamObject: partial objects, then the whole one
  async streamObject() {
    const model = createOpenAI({ baseURL: url, apiKey }).chat("demo");
    const result = streamObject({
      model, schema: Weather, prompt: ask, maxOutputTokens: 60, maxRetries: 0, ...settings });
    const partials = [];
    for await (const partial of result.partialObjectStream) partials.push(partial);
    const object = await result.object;
    expect(partials.length > 1, "several partial objects");
    expect(Weather.safeParse(object).success, "the final object is a Weather");
    return { partials: partials.length, object };
  },
  // AI SDK: a tool with toolChoice required
  async toolChoiceRequired() {
    const model = createOpenAI({ baseURL: url, apiKey }).chat("demo");
    const getWeather = tool({
      description: "Get current temperature for a given location.",
      inputSchema: z.object({ location: z.string() }) });
    const result = await generateText({
      model, tools: { getWeather }, toolChoice: "required", prompt: ask,
      maxOutputTokens: 60, maxRetries: 0, ...settings });
    expect(result.finishReason === "tool-calls", "the answer is a tool call");
    const call = result.toolCalls[0];
    expect(call.toolName === "getWeather" && typeof call.input.location === "string",
      "getWeather is called with a location");
    return call.input;
  },
};

console.log(JSON.stringify(await checks[check]()));
