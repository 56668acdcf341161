using System.Text.Json;
using KernelLM.Models;
using KernelLM.Models.Calibration;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Generation;

/// <summary>
/// The threshold calibration: the weighted logistic regression recovers known parameters, the held-out cut-off
/// separates separable data, the file round-trips and is refused naming the file when wrong, and on the embedded model
/// the labels are the Scorer's top-1 hits.
/// </summary>
[TestFixture]
public sealed class EntropyCalibrationTests
{
    /// <summary>
    /// Samples y ~ Bernoulli(sigmoid(a + b x)), x ~ U(0, 4), n = 20000, 80% positives. With balanced weights the maximum
    /// is the weighted one: the slope is unchanged and the intercept moves by log(w1 / w0) = log(n0 / n1) (weighting a
    /// class scales its odds). Tolerances: about 6 and 5 standard errors; the Fisher information of the slope is about
    /// n var(x) E[p (1 - p)] = 20000 x 4/3 x 0.15 = 4000 (SE 0.016), that of the intercept gives SE about 0.04.
    /// </summary>
    [Test]
    public void The_weighted_regression_recovers_the_slope_and_the_shifted_intercept()
    {
        const double a = 3.0, b = -1.2;
        var random = new Random(17);
        int n = 20000;
        var x = new float[n];
        var y = new bool[n];
        int positives = 0;
        for (int i = 0; i < n; i++)
        {
            x[i] = (float)(4 * random.NextDouble());
            y[i] = random.NextDouble() < 1 / (1 + Math.Exp(-(a + b * x[i])));
            positives += y[i] ? 1 : 0;
        }
        var (intercept, slope) = EntropyCalibration.FitLogistic(x, y);
        Assert.That(slope, Is.EqualTo(b).Within(0.1));
        Assert.That(intercept, Is.EqualTo(a + Math.Log((n - positives) / (double)positives)).Within(0.2));
        TestContext.Out.WriteLine($"{positives} positives of {n}: intercept {intercept:F4} (a + log(n0/n1) = {a + Math.Log((n - positives) / (double)positives):F4}), slope {slope:F4}");
    }

    [Test]
    public void The_unweighted_and_weighted_fits_agree_on_balanced_data()
    {
        // Exactly balanced classes: the weights are all 1, so the fit is the plain maximum likelihood; checked against
        // the score equations sum (p - y) = 0 and sum (p - y) x = 0 (up to the tiny ridge).
        float[] x = [0.1f, 0.4f, 0.7f, 1.0f, 1.3f, 1.6f, 1.9f, 2.2f, 2.5f, 2.8f];
        bool[] y = [true, true, true, false, true, false, true, false, false, false];
        var (intercept, slope) = EntropyCalibration.FitLogistic(x, y);
        double g0 = 0, g1 = 0;
        for (int i = 0; i < x.Length; i++)
        {
            double p = 1 / (1 + Math.Exp(-(intercept + slope * x[i])));
            g0 += p - (y[i] ? 1 : 0);
            g1 += (p - (y[i] ? 1 : 0)) * x[i];
        }
        Assert.That(Math.Abs(g0), Is.LessThan(1e-4));
        Assert.That(Math.Abs(g1), Is.LessThan(1e-4));
        Assert.That(slope, Is.Negative);
    }

    [Test]
    public void Separable_steps_give_a_threshold_between_the_classes_and_full_held_out_accuracy()
    {
        var random = new Random(3);
        var steps = new List<CalibrationStep>();
        for (int i = 0; i < 500; i++)
        {
            bool correct = random.NextDouble() < 0.7;
            float entropy = correct ? (float)(random.NextDouble() * 1.0) : (float)(2.0 + random.NextDouble() * 2.0);
            steps.Add(new CalibrationStep(entropy, correct));
        }
        var threshold = EntropyCalibration.Calibrate(steps, texts: 1, model: "synthetic");
        Assert.That(threshold.Threshold, Is.InRange(1.0f, 2.0f));
        Assert.That(threshold.HeldOutAccuracy, Is.EqualTo(1.0));
        Assert.That(threshold.HeldOutSteps, Is.EqualTo(100));
        Assert.That(threshold.TrainingSteps, Is.EqualTo(400));
        Assert.That(threshold.Slope, Is.Negative);
        Assert.That(EntropyCalibration.ThresholdFor(threshold.Cutoff, threshold.Intercept, threshold.Slope), Is.EqualTo(threshold.Threshold));
    }

    [Test]
    public void The_cut_off_maximises_held_out_accuracy()
    {
        // Overlapping classes: every cut-off's held-out accuracy is recomputed here; none beats the chosen one.
        var random = new Random(9);
        var steps = new List<CalibrationStep>();
        for (int i = 0; i < 2000; i++)
        {
            float entropy = (float)(random.NextDouble() * 4);
            steps.Add(new CalibrationStep(entropy, random.NextDouble() < 1 / (1 + Math.Exp(-(2 - 1.5 * entropy)))));
        }
        var chosen = EntropyCalibration.Calibrate(steps);
        var heldOut = steps.Where((_, i) => i % EntropyCalibration.HeldOutEvery == EntropyCalibration.HeldOutEvery - 1).ToList();
        for (int percent = 1; percent <= 99; percent++)
        {
            float threshold = EntropyCalibration.ThresholdFor(percent / 100.0, chosen.Intercept, chosen.Slope);
            double accuracy = heldOut.Count(s => (s.Entropy < threshold) == s.GreedyCorrect) / (double)heldOut.Count;
            Assert.That(accuracy, Is.LessThanOrEqualTo(chosen.HeldOutAccuracy), $"cut-off {percent / 100.0}");
        }
        // sigmoid(2 - 1.5 H) crosses 1/2 at H = 4/3: the accuracy-optimal threshold is near it.
        Assert.That(chosen.Threshold, Is.EqualTo(4.0 / 3).Within(0.4));
    }

    [Test]
    public void Data_that_cannot_give_a_threshold_is_refused()
    {
        var allRight = Enumerable.Range(0, 50).Select(i => new CalibrationStep(i * 0.1f, true)).ToList();
        Assert.That(() => EntropyCalibration.Calibrate(allRight), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("greedy hits"));
        var backwards = Enumerable.Range(0, 50).Select(i => new CalibrationStep(i * 0.1f, i > 25)).ToList();
        Assert.That(() => EntropyCalibration.Calibrate(backwards), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("slope"));
        Assert.That(() => EntropyCalibration.Calibrate([new CalibrationStep(1, true), new CalibrationStep(2, false)]),
            Throws.TypeOf<InvalidParameterException>().With.Message.Contains("at least 5"));
        var flat = Enumerable.Range(0, 50).Select(i => new CalibrationStep(1.5f, i % 2 == 0)).ToList();
        Assert.That(() => EntropyCalibration.Calibrate(flat), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("all equal"));
    }

    [Test]
    public void The_threshold_file_round_trips_is_written_atomically_and_is_refused_naming_the_file_when_wrong()
    {
        string directory = TestPaths.NewTemporaryDirectory("calibration");
        try
        {
            string path = EntropyCalibration.PathFor(directory);
            Assert.That(() => EntropyCalibration.Read(path), Throws.TypeOf<InvalidParameterException>().With.Message.Contains(path).And.Message.Contains("calibrate-entropy"));
            var threshold = new EntropyThreshold { Threshold = 1.25f, Cutoff = 0.6, Intercept = 2, Slope = -1.5, HeldOutAccuracy = 0.9, TrainingSteps = 8, HeldOutSteps = 2, Texts = 1, Model = "m" };
            EntropyCalibration.Save(threshold, path);
            Assert.That(EntropyCalibration.Read(path), Is.EqualTo(threshold));
            Assert.That(Directory.GetFiles(directory).Select(Path.GetFileName), Is.EqualTo(new[] { EntropyCalibration.FileName }), "no temporary file left");
            using (var document = JsonDocument.Parse(File.ReadAllText(path)))
            {
                Assert.That(document.RootElement.GetProperty("entropy_threshold").GetSingle(), Is.EqualTo(1.25f));
            }

            File.WriteAllText(path, "{\"format\": \"kernellm-entropy-threshold/1\", \"entropy_threshold\": -2}");
            Assert.That(() => EntropyCalibration.Read(path), Throws.TypeOf<ModelConfigException>().With.Message.Contains(path).And.Message.Contains("entropy_threshold"));
            File.WriteAllText(path, "{\"format\": \"kernellm-entropy-threshold/1\"}");
            Assert.That(() => EntropyCalibration.Read(path), Throws.TypeOf<ModelConfigException>().With.Message.Contains(path).And.Message.Contains("entropy_threshold"));
            File.WriteAllText(path, "{\"format\": \"other\", \"entropy_threshold\": 1}");
            Assert.That(() => EntropyCalibration.Read(path), Throws.TypeOf<ModelConfigException>().With.Message.Contains("format"));
            File.WriteAllText(path, "not json");
            Assert.That(() => EntropyCalibration.Read(path), Throws.TypeOf<ModelConfigException>().With.Message.Contains(path));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Test]
    public void The_threshold_shipped_with_the_embedded_model_is_what_calibration_on_its_sample_stories_gives()
    {
        using var model = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Device = "cpu", Threads = 2 });
        string[] texts = [.. File.ReadLines(Path.Combine(TestPaths.TinyStories, "corpus", "sample_stories.txt")).Where(line => line.Length > 0)];
        var calibrated = EntropyCalibrator.Calibrate(model, texts);
        var shipped = EntropyCalibration.Read(EntropyCalibration.PathFor(TestPaths.TinyStories));
        // Summation order (threads, chunking) moves entropies by a few ulps: the fit moves as little.
        Assert.That(calibrated.Threshold, Is.EqualTo(shipped.Threshold).Within(1e-4));
        Assert.That(calibrated.Cutoff, Is.EqualTo(shipped.Cutoff));
        Assert.That(calibrated.HeldOutAccuracy, Is.EqualTo(shipped.HeldOutAccuracy).Within(1e-9));
        Assert.That((calibrated.TrainingSteps, calibrated.HeldOutSteps, calibrated.Texts), Is.EqualTo((shipped.TrainingSteps, shipped.HeldOutSteps, shipped.Texts)));
    }

    [Test]
    public void On_the_embedded_model_each_step_is_labelled_by_the_scorers_top_1()
    {
        using var model = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Device = "cpu", Threads = 2, ContextLength = 256 });
        string[] texts = File.ReadLines(Path.Combine(TestPaths.TinyStories, "corpus", "sample_stories.txt")).Take(3).ToArray();
        var steps = EntropyCalibrator.CollectSteps(model, texts);
        var expected = texts.SelectMany(text => model.Score(text)).ToList();
        Assert.That(steps, Has.Count.EqualTo(expected.Count));
        // Greedy right iff the reference token has the largest log-prob of its row: recomputed from a plain forward pass.
        using var session = model.Model.CreateSession();
        var logits = new float[model.Config.VocabularySize];
        int index = 0;
        foreach (string text in texts)
        {
            int[] ids = model.Encode(text);
            session.Reset();
            for (int i = 1; i < ids.Length; i++, index++)
            {
                session.Forward(ids.AsSpan(i - 1, 1), logits);
                // Decode here, prefill chunks in the scorer: a different summation order, so near ties are left out.
                var sorted = logits.OrderDescending().Take(2).ToArray();
                if (sorted[0] - sorted[1] > 1e-3f)
                {
                    bool top1 = Array.IndexOf(logits, sorted[0]) == ids[i];
                    Assert.That(steps[index].GreedyCorrect, Is.EqualTo(top1), $"step {index}");
                }
                Assert.That(steps[index].Entropy, Is.EqualTo(expected[index].Entropy));
            }
        }
        Assert.That(steps.Count(s => s.GreedyCorrect), Is.InRange(1, steps.Count - 1), "both labels occur");
    }
}
