using System.Diagnostics;
using System.Globalization;
using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Cpu;
using KernelLM.Tests.Fixtures;

namespace KernelLM.Bench;

/// <summary>
/// The CPU race: KernelLM's CPU device and llama.cpp (LLamaSharp 0.30.0's CPU backend) in one process, on the
/// same weights (the HF folder for KernelLM, its GGUF export for llama.cpp), the same thread count and the same
/// token ids. Per engine: load time, prefill tokens/s (one batch of the prompt, last position's logits), decode
/// tokens/s (single-token steps after the prompt, fixed ids, logits of each step), and peak resident memory.
///
/// A plain timed runner rather than a BenchmarkDotNet suite, for three reasons. Peak memory is per engine, read
/// from the kernel (VmHWM, reset through /proc/self/clear_refs before each engine loads), not managed
/// allocations. The machine is shared (2 cores, other sessions build on it): each round is kept only if other
/// processes used under 5% of the CPU meanwhile (from /proc/stat), and the engines alternate round by round so
/// that both see the same machine. And a 1B-parameter round takes seconds, which BenchmarkDotNet's pilot and
/// warm-up stages would multiply many times over on 2 cores.
///
/// Settings: KernelLM as the CLI runs it (memory-mapped safetensors, prefetched, fp32 activations and KV cache);
/// llama.cpp with its own defaults (memory-mapped GGUF, F16 KV cache, flash attention "auto") except the thread
/// count (n_threads = n_threads_batch) and a batch that takes the prompt in one ubatch. A round resets the
/// context, times the prompt, then times the decode steps; after one warm-up round per engine, the median of
/// the clean rounds is reported. Peak memory is VmHWM after the warm-up minus the RSS before the load: weights
/// (mapped pages count once touched), KV cache, activations and scratch.
///
///   dotnet run -c Release --project bench -- --race [--models embedded,1b-bf16,1b-f32] [--threads 2,1]
///       [--prompt 64] [--decode 32] [--rounds 5] [--cache DIR] [--profile]
///
/// The 1B-shaped folders and their GGUF files are written once under --cache (default: the temp folder,
/// ~15 GB for both dtypes) and reused. --profile adds KernelLM's time per op group (from the session's
/// activation observer) and a GEMV probe (cache-resident vs streamed) that says whether the loop or memory
/// sets the decode speed.
/// </summary>
public static class CpuRaceBenchmark
{
    private sealed record Options(string[] Models, int[] Threads, int PromptTokens, int DecodeTokens, int Rounds, string Cache, bool Profile);

    private sealed record Model(string Name, string Description, string Directory, string Gguf, int Rounds);

    private sealed record EngineResult(string Engine, double LoadSeconds, double PrefillTokensPerSecond, double DecodeTokensPerSecond, long PeakBytes,
        int CleanRounds, int DiscardedRounds, double BestPrefillTokensPerSecond, double BestDecodeTokensPerSecond);

    private interface IRaceEngine : IDisposable
    {
        int VocabularySize { get; }
        void Prefill(int[] prompt, float[] logits);
        void Decode(int token, int position, float[] logits);
        void Reset();
    }

    public static int Run(IReadOnlyList<string> args)
    {
        ArgumentNullException.ThrowIfNull(args);
        var options = Parse(args);
        var output = Console.Out;
        output.WriteLine("# CPU race: KernelLM vs llama.cpp");
        output.WriteLine($"machine: {CpuName()}, {Environment.ProcessorCount} logical cores, {TotalMemoryGigabytes():F0} GB; .NET {Environment.Version}");
        output.WriteLine($"llama.cpp (LLamaSharp 0.30.0 CPU backend): {LlamaCppModel.SystemInfo.Trim()}");
        output.WriteLine($"prompt {options.PromptTokens} tokens, decode {options.DecodeTokens} tokens; median of {options.Rounds} clean rounds per engine (embedded model: 10x) after 1 warm-up round");
        var bandwidth = options.Threads.Distinct().ToDictionary(t => t, MeasureReadBandwidth);
        foreach (var (threads, gigabytes) in bandwidth.OrderBy(pair => pair.Key))
        {
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"streaming read bandwidth, {threads} thread(s): {gigabytes:F1} GB/s (1 GiB fp32 TensorPrimitives.Sum, best of 5 clean passes)"));
        }
        output.WriteLine();

        var rows = new List<string>();
        foreach (string name in options.Models)
        {
            var model = Prepare(name, options);
            output.WriteLine($"## {model.Name}: {model.Description}");
            long bytesPerToken;
            using (var probe = LlamaModel.Load(model.Directory, new ModelLoadOptions { Prefetch = false, ContextLength = 8 }))
            {
                bytesPerToken = probe.BytesPerDecodedToken;
            }
            foreach (int threads in options.Threads)
            {
                int[] prompt = LargeSyntheticModel.TokenIds(options.PromptTokens, VocabularyOf(model), seed: 1);
                int[] decoded = LargeSyntheticModel.TokenIds(options.DecodeTokens, VocabularyOf(model), seed: 2);
                int context = prompt.Length + decoded.Length;
                var results = Race(model.Rounds, prompt, decoded,
                [
                    ("KernelLM", () => new KernelEngine(model.Directory, threads, context)),
                    ("llama.cpp", () => new LlamaCppEngine(model.Gguf, threads, context, prompt.Length)),
                ]);
                var (kernel, llama) = (results[0], results[1]);
                foreach (var result in results)
                {
                    double gigabytes = result.DecodeTokensPerSecond * bytesPerToken / 1e9;
                    output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"  {threads} thread(s) {result.Engine,-9}: load {result.LoadSeconds,6:F2} s, prefill {result.PrefillTokensPerSecond,8:F1} tok/s, " +
                        $"decode {result.DecodeTokensPerSecond,8:F1} tok/s ({gigabytes:F1} GB/s of weights, {100 * gigabytes / bandwidth[threads]:F0}% of the read bandwidth), " +
                        $"peak memory {result.PeakBytes / 1e6:F0} MB; {result.CleanRounds} clean rounds ({result.DiscardedRounds} disturbed, discarded), " +
                        $"best round: prefill {result.BestPrefillTokensPerSecond:F1}, decode {result.BestDecodeTokensPerSecond:F1} tok/s"));
                }
                output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"  {threads} thread(s) KernelLM / llama.cpp: prefill {kernel.PrefillTokensPerSecond / llama.PrefillTokensPerSecond:F2}x, decode {kernel.DecodeTokensPerSecond / llama.DecodeTokensPerSecond:F2}x, peak memory {(double)kernel.PeakBytes / llama.PeakBytes:F2}x"));
                rows.Add(string.Create(CultureInfo.InvariantCulture,
                    $"| {model.Name} | {threads} | {kernel.PrefillTokensPerSecond:F1} | {llama.PrefillTokensPerSecond:F1} | **{kernel.PrefillTokensPerSecond / llama.PrefillTokensPerSecond:F2}** " +
                    $"| {kernel.DecodeTokensPerSecond:F1} | {llama.DecodeTokensPerSecond:F1} | **{kernel.DecodeTokensPerSecond / llama.DecodeTokensPerSecond:F2}** " +
                    $"| {kernel.PeakBytes / 1e6:F0} | {llama.PeakBytes / 1e6:F0} |"));
            }
            if (options.Profile)
            {
                Profile(model, options, output);
                foreach (int threads in options.Threads.Distinct().Order())
                {
                    ProbeGemv(model.Name == "1b-f32" ? DType.F32 : DType.BF16, threads, bandwidth[threads], output);
                }
            }
            output.WriteLine();
        }

        output.WriteLine("| model | threads | prefill tok/s KernelLM | llama.cpp | ratio | decode tok/s KernelLM | llama.cpp | ratio | peak MB KernelLM | llama.cpp |");
        output.WriteLine("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        rows.ForEach(output.WriteLine);
        return 0;
    }

    private static Options Parse(IReadOnlyList<string> args)
    {
        var options = new Options(["embedded", "1b-bf16", "1b-f32"], [2, 1], 64, 32, 5, Path.Combine(Path.GetTempPath(), "kernellm-race"), false);
        for (int i = 0; i < args.Count; i++)
        {
            string Value() => i + 1 < args.Count ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
            int[] Integers() => Value().Split(',').Select(v => int.Parse(v, CultureInfo.InvariantCulture)).ToArray();
            options = args[i] switch
            {
                "--race" => options,
                "--models" => options with { Models = Value().Split(',') },
                "--threads" => options with { Threads = Integers() },
                "--prompt" => options with { PromptTokens = Integers()[0] },
                "--decode" => options with { DecodeTokens = Integers()[0] },
                "--rounds" => options with { Rounds = Integers()[0] },
                "--cache" => options with { Cache = Value() },
                "--profile" => options with { Profile = true },
                _ => throw new ArgumentException($"unknown race option '{args[i]}' (--models, --threads, --prompt, --decode, --rounds, --cache, --profile)"),
            };
        }
        return options;
    }

    private static Model Prepare(string name, Options options)
    {
        Directory.CreateDirectory(options.Cache);
        string directory;
        string description;
        int rounds = options.Rounds;
        switch (name)
        {
            case "embedded":
                directory = EmbeddedModelDirectory();
                description = "models/tiny-stories (5.2 M parameters, BF16, trained)";
                rounds *= 10;
                break;
            case "1b-bf16":
            case "1b-f32":
                var dtype = name == "1b-bf16" ? DType.BF16 : DType.F32;
                var clock = Stopwatch.StartNew();
                directory = LargeSyntheticModel.Ensure(options.Cache, dtype);
                description = LargeSyntheticModel.Describe(dtype) + string.Create(CultureInfo.InvariantCulture, $" (folder ready in {clock.Elapsed.TotalSeconds:F0} s)");
                break;
            default:
                throw new ArgumentException($"unknown race model '{name}' (embedded, 1b-bf16, 1b-f32)");
        }
        string gguf = Path.Combine(options.Cache, $"{name}.gguf");
        string stamp = gguf + ".source";
        string source = string.Join(';', Directory.GetFiles(directory).Order(StringComparer.Ordinal).Select(f => $"{f}:{new FileInfo(f).Length}:{File.GetLastWriteTimeUtc(f).Ticks}"));
        if (!File.Exists(gguf) || !File.Exists(stamp) || File.ReadAllText(stamp) != source)
        {
            GgufExport.Export(directory, gguf);
            File.WriteAllText(stamp, source);
        }
        return new Model(name, description, directory, gguf, rounds);
    }

    private static int VocabularyOf(Model model) => model.Name == "embedded" ? 2048 : LargeSyntheticModel.Vocabulary;

    private static string EmbeddedModelDirectory()
    {
        for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            string candidate = Path.Combine(directory.FullName, "models", "tiny-stories");
            if (File.Exists(Path.Combine(candidate, "model.safetensors")))
            {
                return candidate;
            }
        }
        throw new DirectoryNotFoundException($"models/tiny-stories not found above {AppContext.BaseDirectory}");
    }

    // ---------------------------------------------------------------- measuring one engine

    /// <summary>
    /// Loads each engine in turn (peak memory measured from its own baseline, after one warm-up round), then
    /// alternates single rounds between them, keeping a round only when other processes stayed under
    /// <see cref="CpuActivity.QuietShare"/> of the CPU and no weight page had to be read from disk, until each has <paramref name="rounds"/> clean rounds
    /// (or 30 minutes passed: the medians are then of fewer rounds, and the counts say so).
    /// </summary>
    private static EngineResult[] Race(int rounds, int[] prompt, int[] decoded, (string Name, Func<IRaceEngine> Load)[] engines)
    {
        var loaded = new List<(string Name, IRaceEngine Engine, double LoadSeconds, long PeakBytes)>();
        try
        {
            float[] logits = [];
            foreach (var (name, load) in engines)
            {
                GC.Collect();
                GC.WaitForPendingFinalizers();
                CpuActivity.WaitForQuiet(Console.Out);
                long baseline = ResidentBytes("VmRSS");
                ResetPeakResident();
                var clock = Stopwatch.StartNew();
                var engine = load();
                double loadSeconds = clock.Elapsed.TotalSeconds;
                loaded.Add((name, engine, loadSeconds, 0));
                logits = new float[Math.Max(logits.Length, engine.VocabularySize)];
                Round(engine, prompt, decoded, logits);
                loaded[^1] = (name, engine, loadSeconds, ResidentBytes("VmHWM") - baseline);
            }

            var prefill = loaded.Select(_ => new List<double>()).ToArray();
            var decode = loaded.Select(_ => new List<double>()).ToArray();
            var discarded = new int[loaded.Count];
            var deadline = Stopwatch.StartNew();
            while (prefill.Any(list => list.Count < rounds) && deadline.Elapsed < TimeSpan.FromMinutes(30))
            {
                for (int e = 0; e < loaded.Count; e++)
                {
                    if (prefill[e].Count >= rounds)
                    {
                        continue;
                    }
                    CpuActivity.WaitForQuiet(Console.Out);
                    var activity = CpuActivity.Start();
                    var (prefillSeconds, decodeSeconds) = Round(loaded[e].Engine, prompt, decoded, logits);
                    if (activity.ForeignShare() > CpuActivity.QuietShare || activity.MajorFaults() > 0)
                    {
                        discarded[e]++;
                        continue;
                    }
                    prefill[e].Add(prompt.Length / prefillSeconds);
                    decode[e].Add(decoded.Length / decodeSeconds);
                }
            }
            return loaded.Select((engine, e) => new EngineResult(engine.Name, engine.LoadSeconds, Median(prefill[e]), Median(decode[e]),
                engine.PeakBytes, prefill[e].Count, discarded[e], prefill[e].DefaultIfEmpty(double.NaN).Max(), decode[e].DefaultIfEmpty(double.NaN).Max())).ToArray();
        }
        finally
        {
            loaded.ForEach(engine => engine.Engine.Dispose());
        }
    }

    /// <summary>One round: reset, the prompt in one call, then one call per decoded token. Seconds of each part.</summary>
    private static (double Prefill, double Decode) Round(IRaceEngine engine, int[] prompt, int[] decoded, float[] logits)
    {
        engine.Reset();
        long start = Stopwatch.GetTimestamp();
        engine.Prefill(prompt, logits);
        double prefillSeconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
        start = Stopwatch.GetTimestamp();
        for (int i = 0; i < decoded.Length; i++)
        {
            engine.Decode(decoded[i], prompt.Length + i, logits);
        }
        return (prefillSeconds, Stopwatch.GetElapsedTime(start).TotalSeconds);
    }

    private static double Median(List<double> values)
    {
        if (values.Count == 0)
        {
            return double.NaN;
        }
        values.Sort();
        int middle = values.Count / 2;
        return values.Count % 2 == 1 ? values[middle] : (values[middle - 1] + values[middle]) / 2;
    }

    private sealed class KernelEngine(string directory, int threads, int context) : IRaceEngine
    {
        private readonly LlamaModel _model = LlamaModel.Load(directory, new ModelLoadOptions { Threads = threads, ContextLength = context });
        private LlamaSession? _session;

        private LlamaSession Session => _session ??= _model.CreateSession();

        public int VocabularySize => _model.Config.VocabularySize;

        public void Prefill(int[] prompt, float[] logits) => Session.Forward(prompt, logits);

        public void Decode(int token, int position, float[] logits) => Session.Forward([token], logits);

        public void Reset() => Session.Reset();

        public void Dispose()
        {
            _session?.Dispose();
            _model.Dispose();
        }
    }

    private sealed class LlamaCppEngine(string gguf, int threads, int context, int batch) : IRaceEngine
    {
        private readonly LlamaCppModel _model = LlamaCppModel.Load(gguf, threads, context, batch, conformance: false);

        public int VocabularySize => _model.VocabularySize;

        public void Prefill(int[] prompt, float[] logits) => _model.Decode(prompt, 0, allPositions: false, logits);

        public void Decode(int token, int position, float[] logits) => _model.Decode([token], position, allPositions: false, logits);

        public void Reset() => _model.Clear();

        public void Dispose() => _model.Dispose();
    }

    // ---------------------------------------------------------------- where KernelLM's time goes

    /// <summary>
    /// Time between consecutive activation-observer callbacks of a session, summed by the op group that ends at
    /// each callback: decode (per token) and prefill (per prompt), at the largest thread count. Matrix groups
    /// also show the weight bytes they stream per token and the GB/s that implies.
    /// </summary>
    private static void Profile(Model model, Options options, TextWriter output)
    {
        int threads = options.Threads.Max();
        int[] prompt = LargeSyntheticModel.TokenIds(options.PromptTokens, VocabularyOf(model), seed: 1);
        int[] decoded = LargeSyntheticModel.TokenIds(options.DecodeTokens, VocabularyOf(model), seed: 2);
        using var engine = LlamaModel.Load(model.Directory, new ModelLoadOptions { Threads = threads, ContextLength = prompt.Length + decoded.Length });
        using var session = engine.CreateSession();
        var logits = new float[engine.Config.VocabularySize];
        var groups = new Dictionary<string, double>(StringComparer.Ordinal);
        long last = 0;
        session.Observer = (name, _, _, _) =>
        {
            long now = Stopwatch.GetTimestamp();
            string group = Group(name);
            groups[group] = groups.GetValueOrDefault(group) + Stopwatch.GetElapsedTime(last, now).TotalMilliseconds;
            last = now;
        };
        void Timed(Action forward)
        {
            last = Stopwatch.GetTimestamp();
            forward();
            groups["LM head"] = groups.GetValueOrDefault("LM head") + Stopwatch.GetElapsedTime(last).TotalMilliseconds;
        }

        session.Forward(prompt, logits); // warm-up: prefill and decode paths jitted, pages touched
        for (int i = 0; i < decoded.Length; i++)
        {
            session.Forward([decoded[i]], logits);
        }
        var prefill = new Dictionary<string, double>(StringComparer.Ordinal);
        double foreign = 1;
        for (int attempt = 0; attempt < 5 && foreign > CpuActivity.QuietShare; attempt++)
        {
            CpuActivity.WaitForQuiet(output);
            var activity = CpuActivity.Start();
            groups.Clear();
            session.Reset();
            Timed(() => session.Forward(prompt, logits));
            prefill = new Dictionary<string, double>(groups);
            groups.Clear();
            for (int i = 0; i < decoded.Length; i++)
            {
                Timed(() => session.Forward([decoded[i]], logits));
            }
            foreign = activity.ForeignShare();
        }
        var layers = engine.Layers;
        var bytes = new Dictionary<string, long>(StringComparer.Ordinal)
        {
            ["q/k/v projections + RoPE"] = layers.Sum(l => l.Query.ByteLength + l.Key.ByteLength + l.Value.ByteLength),
            ["o_proj + residual"] = layers.Sum(l => l.Output.ByteLength),
            ["gate/up projections + SiLU"] = layers.Sum(l => l.Gate.ByteLength + l.Up.ByteLength),
            ["down_proj + residual"] = layers.Sum(l => l.Down.ByteLength),
            ["LM head"] = engine.LmHead.ByteLength,
        };
        output.WriteLine($"  KernelLM time per op group, {threads} thread(s) (activation observer timestamps):");
        output.WriteLine("  | op group | decode ms/token | share | weight GB/s | prefill ms/prompt | share |");
        output.WriteLine("  |---|---:|---:|---:|---:|---:|");
        double decodeTotal = groups.Values.Sum() / decoded.Length;
        double prefillTotal = prefill.Values.Sum();
        foreach (var (group, total) in groups.OrderByDescending(pair => pair.Value))
        {
            double perToken = total / decoded.Length;
            string rate = bytes.TryGetValue(group, out long b) ? string.Create(CultureInfo.InvariantCulture, $"{b / (perToken / 1e3) / 1e9:F1}") : "";
            double prefillMs = prefill.GetValueOrDefault(group);
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  | {group} | {perToken:F2} | {100 * perToken / decodeTotal:F0}% | {rate} | {prefillMs:F1} | {100 * prefillMs / prefillTotal:F0}% |"));
        }
        output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  | total | {decodeTotal:F2} | | | {prefillTotal:F1} | |"));
        output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  (other processes used {100 * foreign:F0}% of the CPU meanwhile)"));

        // The decode GEMV alone, one matrix at a time, on the model's own memory-mapped weights: what the kernel
        // streams from file-backed pages without the rest of the forward pass around it.
        var x = new float[Math.Max(engine.Config.HiddenSize, engine.Config.IntermediateSize)];
        x.AsSpan().Fill(0.01f);
        var y = new float[Math.Max(engine.Config.VocabularySize, engine.Config.IntermediateSize)];
        var probes = new (string Name, WeightMatrix[] Matrices)[]
        {
            ("LM head", [engine.LmHead]),
            ("gate_proj x layers", [.. layers.Select(l => l.Gate)]),
            ("k_proj x layers", [.. layers.Select(l => l.Key)]),
        };
        foreach (var (probeName, matrices) in probes)
        {
            long probeBytes = matrices.Sum(m => m.ByteLength);
            double seconds = double.NaN;
            for (int attempt = 0; attempt < 5; attempt++)
            {
                CpuActivity.WaitForQuiet(output);
                var activity = CpuActivity.Start();
                long start = Stopwatch.GetTimestamp();
                for (int repeat = 0; repeat < 3; repeat++)
                {
                    foreach (var matrix in matrices)
                    {
                        engine.Device.Linear(x, 1, matrix, default, y);
                    }
                }
                seconds = Stopwatch.GetElapsedTime(start).TotalSeconds / 3;
                if (activity.ForeignShare() <= CpuActivity.QuietShare)
                {
                    break;
                }
            }
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  KernelLM GEMV alone on the mapped {probeName} ({matrices.Length} x [{matrices[0].Rows}, {matrices[0].Cols}] {matrices[0].DType.ToSafeTensorsName()}, {probeBytes / 1e6:F0} MB), {threads} thread(s): {probeBytes / seconds / 1e9:F1} GB/s"));
        }
    }

    /// <summary>
    /// Is KernelLM's decode GEMV bound by memory or by its inner loop? The same 2048-column GEMV (one token) on a
    /// 512 KiB matrix that stays in L2 and on a 256 MiB one streamed from memory: equal element rates mean the
    /// loop, not DRAM, sets the speed. Each figure is the first of up to five runs that other processes left alone.
    /// </summary>
    private static unsafe void ProbeGemv(DType dtype, int threads, double bandwidth, TextWriter output)
    {
        const int Cols = 2048;
        using var device = new CpuDevice(threads, Cols);
        var x = new float[Cols];
        var random = new Random(3);
        for (int i = 0; i < Cols; i++)
        {
            x[i] = (float)(random.NextDouble() - 0.5);
        }
        var line = new List<string>();
        int cacheRows = 512 * 1024 / (Cols * dtype.SizeOf());
        foreach (int rows in new[] { cacheRows, (int)(256L * 1024 * 1024 / (Cols * dtype.SizeOf())) })
        {
            long bytes = (long)rows * Cols * dtype.SizeOf();
            byte* data = (byte*)NativeMemory.AlignedAlloc((nuint)bytes, 64);
            try
            {
                var fill = new Span<byte>(data, (int)Math.Min(bytes, int.MaxValue));
                random.NextBytes(fill);
                if (dtype == DType.BF16)
                {
                    // Keep every bf16 finite and O(1): clear the top exponent bits of each element.
                    var words = new Span<ushort>(data, (int)(bytes / 2));
                    for (int i = 0; i < words.Length; i++)
                    {
                        words[i] = (ushort)((words[i] & 0x807F) | 0x3F00);
                    }
                }
                else
                {
                    var floats = new Span<float>(data, (int)(bytes / 4));
                    for (int i = 0; i < floats.Length; i++)
                    {
                        floats[i] = (float)(random.NextDouble() - 0.5);
                    }
                }
                var weight = new WeightMatrix("probe", dtype, rows, Cols, data);
                var y = new float[rows];
                int repeats = (int)Math.Max(4, 2_000_000_000L / bytes);
                device.Linear(x, 1, weight, default, y);
                double seconds = double.NaN;
                for (int attempt = 0; attempt < 5; attempt++)
                {
                    CpuActivity.WaitForQuiet(output);
                    var activity = CpuActivity.Start();
                    long start = Stopwatch.GetTimestamp();
                    for (int r = 0; r < repeats; r++)
                    {
                        device.Linear(x, 1, weight, default, y);
                    }
                    seconds = Stopwatch.GetElapsedTime(start).TotalSeconds / repeats;
                    if (activity.ForeignShare() <= CpuActivity.QuietShare)
                    {
                        break;
                    }
                }
                line.Add(string.Create(CultureInfo.InvariantCulture,
                    $"{(rows == cacheRows ? "L2-resident" : "streamed")} {bytes / 1048576.0:F1} MiB: {(double)rows * Cols / seconds / 1e9:F1} G elements/s ({bytes / seconds / 1e9:F1} GB/s)"));
            }
            finally
            {
                NativeMemory.AlignedFree(data);
            }
        }
        output.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  KernelLM {dtype.ToSafeTensorsName()} GEMV, 1 token x {Cols} columns, {threads} thread(s): {string.Join("; ", line)}; read bandwidth {bandwidth:F1} GB/s"));
    }

    /// <summary>The op group that ends at the observer callback <paramref name="activation"/> (LlamaSession's names).</summary>
    private static string Group(string activation) => activation switch
    {
        "embed" => "embedding",
        "attn_norm" or "mlp_norm" or "final_norm" => "RMSNorm",
        "q" or "k" or "v" => "q/k/v projections + RoPE",
        "attn" => "KV write + attention",
        "attn_out" => "o_proj + residual",
        "mlp" => "gate/up projections + SiLU",
        "out" => "down_proj + residual",
        _ => activation,
    };

    // ---------------------------------------------------------------- machine facts

    private static unsafe double MeasureReadBandwidth(int threads)
    {
        const long Floats = 1L << 28; // 1 GiB
        float* data = (float*)NativeMemory.AlignedAlloc((nuint)(Floats * sizeof(float)), 64);
        try
        {
            new Span<float>(data, 1 << 20).Fill(1f);
            for (long i = 1 << 20; i < Floats; i += 1 << 20)
            {
                new Span<float>(data, 1 << 20).CopyTo(new Span<float>(data + i, 1 << 20));
            }
            double best = 0;
            long slice = Floats / threads;
            for (int pass = 0, clean = 0; clean < 5 && pass < 50; pass++)
            {
                CpuActivity.WaitForQuiet(Console.Out);
                var activity = CpuActivity.Start();
                var sums = new float[threads];
                long start = Stopwatch.GetTimestamp();
                Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads }, t =>
                {
                    float sum = 0;
                    for (long offset = t * slice; offset < (t + 1) * slice; offset += 1 << 20)
                    {
                        sum += TensorPrimitives.Sum(new ReadOnlySpan<float>(data + offset, 1 << 20));
                    }
                    sums[t] = sum;
                });
                double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
                GC.KeepAlive(sums);
                if (activity.ForeignShare() <= CpuActivity.QuietShare)
                {
                    best = Math.Max(best, Floats * sizeof(float) / seconds / 1e9);
                    clean++;
                }
            }
            return best;
        }
        finally
        {
            NativeMemory.AlignedFree(data);
        }
    }

    private static long ResidentBytes(string field)
    {
        foreach (string line in File.ReadLines("/proc/self/status"))
        {
            if (line.StartsWith(field + ":", StringComparison.Ordinal))
            {
                return long.Parse(line.AsSpan(field.Length + 1).Trim().TrimEnd("kB").Trim(), CultureInfo.InvariantCulture) * 1024;
            }
        }
        throw new InvalidOperationException($"/proc/self/status has no {field}");
    }

    /// <summary>Resets VmHWM to the current RSS (Linux: "5" to /proc/self/clear_refs).</summary>
    private static void ResetPeakResident() => File.WriteAllText("/proc/self/clear_refs", "5");

    private static string CpuName() =>
        File.ReadLines("/proc/cpuinfo").FirstOrDefault(line => line.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim() ?? "unknown CPU";

    private static double TotalMemoryGigabytes() =>
        long.Parse(File.ReadLines("/proc/meminfo").First().Split(':')[1].Trim().TrimEnd("kB").Trim(), CultureInfo.InvariantCulture) / 1e6 * 1.024;

    /// <summary>CPU time of other processes, from /proc/stat (all CPUs) minus /proc/self/stat (this process).</summary>
    private readonly struct CpuActivity
    {
        public const double QuietShare = 0.05;

        private readonly long _busy;
        private readonly long _total;
        private readonly long _self;
        private readonly long _majorFaults;

        private CpuActivity(long busy, long total, long self, long majorFaults)
        {
            _busy = busy;
            _total = total;
            _self = self;
            _majorFaults = majorFaults;
        }

        public static CpuActivity Start()
        {
            // cpu  user nice system idle iowait irq softirq steal ...  (clock ticks)
            long[] fields = File.ReadLines("/proc/stat").First().Split(' ', StringSplitOptions.RemoveEmptyEntries).Skip(1)
                .Select(field => long.Parse(field, CultureInfo.InvariantCulture)).ToArray();
            long total = fields.Take(8).Sum();
            long busy = total - fields[3] - fields[4];
            // /proc/self/stat: pid (comm) state ... field 12 majflt, 14 utime, 15 stime; comm may hold spaces, so
            // split after ')': rest[0] is field 3.
            string stat = File.ReadAllText("/proc/self/stat");
            string[] rest = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            long self = long.Parse(rest[11], CultureInfo.InvariantCulture) + long.Parse(rest[12], CultureInfo.InvariantCulture);
            return new CpuActivity(busy, total, self, long.Parse(rest[9], CultureInfo.InvariantCulture));
        }

        /// <summary>Pages this process had to read from disk since <see cref="Start"/> (weights evicted from the page cache).</summary>
        public long MajorFaults() => Start()._majorFaults - _majorFaults;

        /// <summary>Share of all CPU time since <see cref="Start"/> that other processes used.</summary>
        public double ForeignShare()
        {
            var now = Start();
            long total = now._total - _total;
            return total <= 0 ? 0 : Math.Max(0, (now._busy - _busy) - (now._self - _self)) / (double)total;
        }

        public static void WaitForQuiet(TextWriter output)
        {
            var waited = Stopwatch.StartNew();
            bool told = false;
            while (true)
            {
                var activity = Start();
                Thread.Sleep(1000);
                double foreign = activity.ForeignShare();
                if (foreign <= QuietShare || waited.Elapsed > TimeSpan.FromMinutes(15))
                {
                    return;
                }
                if (!told)
                {
                    output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  waiting for a quiet machine (other processes use {100 * foreign:F0}% of the CPU)"));
                    told = true;
                }
            }
        }
    }
}
