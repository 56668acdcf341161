using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Models.Routing;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;
using Spectre.Console;

namespace KernelLM.Cli;

/// <summary>The `kernellm` command: run, generate, info, score, doctor.</summary>
public static class Program
{
    public const string DefaultPrompt = "Once upon a time";

    private static readonly Option<bool> Verbose = new("--verbose") { Description = "Print stack traces with errors", Recursive = true };

    public static int Main(string[] args) => BuildCommand(Console.Out, Console.Error).Parse(args).Invoke();

    public static RootCommand BuildCommand(TextWriter output, TextWriter errors)
    {
        var root = new RootCommand("KernelLM: Llama-family LLM inference with fused kernels and token-level controls.");
        root.Options.Add(Verbose);
        root.Subcommands.Add(GenerateCommand("run", "Generate a story from the embedded default model (tiny-stories) and print tokens/s.", embeddedDefault: true, output, errors));
        root.Subcommands.Add(GenerateCommand("generate", "Generate text from a Hugging Face model folder.", embeddedDefault: false, output, errors));
        root.Subcommands.Add(InfoCommand(output, errors));
        root.Subcommands.Add(NeedleCommand.Create(output, errors));
        root.Subcommands.Add(ScoreCommand.Create(output, errors));
        root.Subcommands.Add(CalibrateEntropyCommand.Create(output, errors));
        root.Subcommands.Add(DoctorCommand.Create(output));
        return root;
    }

    // ------------------------------------------------------------------ shared options

    internal sealed class DeviceOptions
    {
        public Option<string> Device { get; } = new("--device") { Description = "auto | cpu | cuda | cuda-emulated (auto: CUDA when a device exists)", DefaultValueFactory = _ => "auto" };
        public Option<int> Threads { get; } = new("--threads") { Description = "CPU threads (0 = one per core)", DefaultValueFactory = _ => 0 };
        public Option<int> ContextLength { get; } = new("--context-length") { Description = "KV cache capacity in tokens (0 = model's, capped at 4096)", DefaultValueFactory = _ => 0 };

        public void AddTo(Command command)
        {
            command.Options.Add(Device);
            command.Options.Add(Threads);
            command.Options.Add(ContextLength);
        }

        public ModelLoadOptions Read(ParseResult result) => new()
        {
            Device = result.GetValue(Device) ?? "auto",
            Threads = result.GetValue(Threads),
            ContextLength = result.GetValue(ContextLength),
        };
    }

    internal static Option<string> ModelOption(bool required) => new("--model", "-m")
    {
        Description = required ? "Model folder (config.json, *.safetensors, tokenizer.json)" : "Model folder (default: the embedded tiny-stories)",
        Required = required,
    };

    // ------------------------------------------------------------------ run / generate

    private static Command GenerateCommand(string name, string description, bool embeddedDefault, TextWriter output, TextWriter errors)
    {
        var model = ModelOption(required: !embeddedDefault);
        var prompt = new Option<string>("--prompt", "-p") { Description = "Prompt text", Required = !embeddedDefault };
        var maxTokens = new Option<int>("--max-tokens", "-n") { Description = "Most tokens to generate", DefaultValueFactory = _ => embeddedDefault ? 120 : 256 };
        var temperature = new Option<float>("--temperature", "-t") { Description = "Sampling temperature (0 = greedy)", DefaultValueFactory = _ => 0.8f };
        var topK = new Option<int>("--top-k") { Description = "Keep the k most likely tokens (0 = off)", DefaultValueFactory = _ => 40 };
        var topP = new Option<float>("--top-p") { Description = "Nucleus sampling mass (1 = off)", DefaultValueFactory = _ => 0.95f };
        var minP = new Option<float>("--min-p") { Description = "Drop tokens below min-p x top probability (0 = off)", DefaultValueFactory = _ => 0.05f };
        var repetition = new Option<float>("--repetition-penalty") { Description = "Penalty on tokens already seen (1 = off)", DefaultValueFactory = _ => 1f };
        var seed = new Option<int?>("--seed") { Description = "Random seed (same seed, same output)" };
        var stop = new Option<string[]>("--stop") { Description = "Stop at this text (repeatable)", AllowMultipleArgumentsPerToken = false };
        var device = new DeviceOptions();
        var reports = new ReportOptions();
        var kvSelect = new KvSelectOption();
        var compose = new ComposeOptions();
        var adaptive = new AdaptiveOptions();
        var command = new Command(name, description) { model, prompt, maxTokens, temperature, topK, topP, minP, repetition, seed, stop };
        device.AddTo(command);
        kvSelect.AddTo(command);
        reports.AddTo(command);
        compose.AddTo(command);
        adaptive.AddTo(command);
        command.SetAction(result => Guard(result, errors, () =>
        {
            string directory = result.GetValue(model) ?? LanguageModel.DefaultModelDirectory;
            var report = reports.Read(result);
            var composeRequest = compose.Read(result);
            var routing = adaptive.ReadRouting(result);
            var adaptiveDecoding = adaptive.ReadAdaptive(result, directory);
            if (routing is not null && adaptiveDecoding is not null)
            {
                throw new InvalidParameterException("--adaptive-decoding", "cannot be combined with --draft-model (the routed session does not roll back)");
            }
            // Adaptive decoding chooses greedily: it is the default temperature then, and an explicit other one is refused.
            bool greedyDefault = adaptiveDecoding is not null && result.GetResult(temperature) is not { Implicit: false };
            if (composeRequest is not null && (routing is not null || adaptiveDecoding is not null))
            {
                throw new InvalidParameterException(routing is not null ? "--draft-model" : "--adaptive-decoding",
                    "cannot be combined with a composition (--compose, guidance or contrastive decoding)");
            }
            var options = new GenerationOptions
            {
                MaxNewTokens = result.GetValue(maxTokens),
                StopStrings = result.GetValue(stop) ?? [],
                Sampling = new SamplingOptions
                {
                    Temperature = greedyDefault ? 0 : result.GetValue(temperature),
                    TopK = result.GetValue(topK),
                    TopP = result.GetValue(topP),
                    MinP = result.GetValue(minP),
                    RepetitionPenalty = result.GetValue(repetition),
                    Seed = result.GetValue(seed),
                },
                Signals = report?.Signals,
                Adaptive = adaptiveDecoding,
            };
            options.Validate();
            string text = result.GetValue(prompt) ?? DefaultPrompt;
            using var language = LoadWithProgress(directory, kvSelect.Apply(result, device.Read(result)), errors);
            // Composition members keep full attention: the selection applies to the model the command names.
            using var composition = composeRequest?.Build(language, member => LoadWithProgress(member, device.Read(result), errors, language));
            if (composition is not null)
            {
                errors.WriteLine($"[composition: {composition.Description}]");
            }
            using var draft = routing is null ? null : LoadWithProgress(routing.Value.Directory, device.Read(result), errors, shareDeviceWith: language);
            var routingStats = new RoutingStats();
            var stats = new GenerationStats();
            var collector = report is null ? null : ReportRequest.Collect(language, text);
            output.Write(text);
            output.Flush();
            using var cancel = new CancellationTokenSource();
            ConsoleCancelEventHandler onCancel = (_, e) =>
            {
                e.Cancel = true;
                cancel.Cancel();
            };
            Console.CancelKeyPress += onCancel;
            try
            {
                var tokens = composition is not null ? composition.Generate(text, options, stats, cancel.Token)
                    : draft is null ? language.Generate(text, options, stats, cancel.Token)
                    : RoutedGeneration.Generate(language, draft, text, options, routing!.Value.Options, stats, routingStats, cancel.Token);
                foreach (var token in tokens)
                {
                    collector?.Add(token);
                    output.Write(token.Text);
                    output.Flush();
                }
            }
            catch (OperationCanceledException)
            {
                errors.WriteLine();
                errors.WriteLine("(cancelled)");
            }
            finally
            {
                Console.CancelKeyPress -= onCancel;
            }
            output.WriteLine();
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"[{stats.GeneratedTokens} tokens, prompt {stats.PromptTokens} tokens at {stats.PrefillTokensPerSecond:F1} tok/s, decode {stats.DecodeTokensPerSecond:F1} tokens/s, {language.DeviceName}, finished: {stats.FinishReason}]"));
            AdaptiveOptions.WriteSummary(output, stats, adaptiveDecoding, draft is null ? null : routingStats);
            report?.Write(collector!.Build(stats.FinishReason), errors);
            KvSelectOption.Report(language, errors);
            return 0;
        }));
        return command;
    }

    // ------------------------------------------------------------------ info

    private static Command InfoCommand(TextWriter output, TextWriter errors)
    {
        var directory = new Argument<string>("dir") { Description = "Model folder", Arity = ArgumentArity.ZeroOrOne, DefaultValueFactory = _ => LanguageModel.DefaultModelDirectory };
        var device = new DeviceOptions();
        var command = new Command("info", "Print a model's architecture, sizes and dtypes.") { directory };
        device.AddTo(command);
        command.SetAction(result => Guard(result, errors, () =>
        {
            using var language = LoadWithProgress(result.GetValue(directory)!, device.Read(result), errors);
            var c = language.Config;
            var dtypes = language.Model.Files.SelectMany(f => f.Tensors).GroupBy(t => t.DType.ToSafeTensorsName())
                .Select(g => $"{g.Key} x{g.Count()}");
            var table = new Table().AddColumn("field").AddColumn("value");
            void Row(string key, object value) => table.AddRow(Markup.Escape(key), Markup.Escape(Convert.ToString(value, CultureInfo.InvariantCulture) ?? ""));
            Row("folder", language.Directory);
            Row("architecture", c.ArchitectureName);
            Row("layers", c.Layers);
            Row("hidden size", c.HiddenSize);
            Row("intermediate size", c.IntermediateSize);
            Row("attention heads", $"{c.Heads} (kv heads {c.KvHeads}, group {c.KvGroupSize}, head_dim {c.HeadDim})");
            Row("vocabulary", c.VocabularySize);
            Row("max positions", c.MaxPositionEmbeddings);
            Row("context (KV cache)", language.Model.ContextLength);
            Row("rope", $"theta {c.RopeTheta}" + (c.RopeScaling is { } s ? $", {s.Type} x{s.Factor}" : ""));
            Row("rms_norm_eps", c.RmsNormEpsilon);
            Row("tied embeddings", c.TieWordEmbeddings);
            Row("q/k/v bias", c.QkvBias);
            Row("sliding window", c.SlidingWindow == 0 ? "none" : c.SlidingWindow);
            Row("bos / eos", $"{c.BosTokenId?.ToString(CultureInfo.InvariantCulture) ?? "none"} / {string.Join(", ", c.EosTokenIds)}");
            Row("tensor dtypes", string.Join(", ", dtypes));
            Row("parameters", language.Model.Files.SelectMany(f => f.Tensors).Sum(t => t.ElementCount).ToString("N0", CultureInfo.InvariantCulture));
            Row("weight bytes", FormatBytes(language.Model.WeightBytes));
            Row("bytes per decoded token", FormatBytes(language.Model.BytesPerDecodedToken));
            Row("session memory", FormatBytes(language.SessionBytes) + (language.IsCuda ? " on the device (KV cache + activations + workspace, allocated at load)" : " (KV cache + activations, allocated at load)"));
            if (language.IsCuda)
            {
                Row("device weights", FormatBytes(language.DeviceWeightBytes));
                Row("device memory used", $"{FormatBytes(language.DeviceWeightBytes + language.SessionBytes)} of {FormatBytes(language.DeviceTotalBytes)} (weights + session)");
                Row("device engine", language.DeviceEngine!);
            }
            Row("files", string.Join(", ", language.Model.Files.Select(f => Path.GetFileName(f.FilePath))));
            Row("device", language.DeviceName);
            var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors });
            console.Write(table);
            return 0;
        }));
        return command;
    }

    // ------------------------------------------------------------------ helpers

    private static string FormatBytes(long bytes) =>
        bytes >= 1 << 30 ? string.Create(CultureInfo.InvariantCulture, $"{bytes / (double)(1 << 30):F2} GiB")
        : string.Create(CultureInfo.InvariantCulture, $"{bytes / (double)(1 << 20):F2} MiB");

    /// <summary>Loads the model; when that takes long and stderr is a terminal, shows a progress bar.</summary>
    internal static LanguageModel LoadWithProgress(string directory, ModelLoadOptions options, TextWriter errors, LanguageModel? shareDeviceWith = null)
    {
        if (Console.IsErrorRedirected || !ReferenceEquals(errors, Console.Error))
        {
            return LanguageModel.Load(directory, options, shareDeviceWith);
        }
        var progress = new LoadProgress();
        var load = Task.Run(() => LanguageModel.Load(directory, options with { Progress = progress }, shareDeviceWith));
        // Waiting on the handle does not throw when the load faults: its error surfaces from GetResult below, unwrapped.
        if (!((IAsyncResult)load).AsyncWaitHandle.WaitOne(TimeSpan.FromMilliseconds(400)))
        {
            var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) });
            console.Progress().AutoClear(true).Start(context =>
            {
                var task = context.AddTask($"loading {Path.GetFileName(Path.TrimEndingDirectorySeparator(directory))}", maxValue: 1.0);
                while (!((IAsyncResult)load).AsyncWaitHandle.WaitOne(TimeSpan.FromMilliseconds(100)))
                {
                    task.Value = progress.Fraction;
                }
                task.Value = 1.0;
            });
        }
        return load.GetAwaiter().GetResult();
    }

    internal static int Guard(ParseResult result, TextWriter errors, Func<int> action)
    {
        try
        {
            return action();
        }
        catch (KernelLMException error)
        {
            errors.WriteLine($"error: {error.Message}");
            if (result.GetValue(Verbose))
            {
                errors.WriteLine(error);
            }
            return 1;
        }
        catch (Exception error) when (error is not OutOfMemoryException)
        {
            errors.WriteLine($"error: unexpected {error.GetType().Name}: {error.Message}");
            if (result.GetValue(Verbose))
            {
                errors.WriteLine(error);
            }
            return 2;
        }
    }
}
